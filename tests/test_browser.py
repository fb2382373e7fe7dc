"""The Prefect UI as a user sees it: headless Chromium against a real `prefect server` and `vaeflow serve --pin`.

The deployment page of the pipeline (`vaeflow_pipeline/ui`, the whole pipeline: one of the deployments of the single
pipeline flow) shows the structured `config` parameter as a form (the Training section's epochs, lr, batch_size ...
with the pinned config as defaults, and each plugin section as tabs, one per registered plugin, with that plugin's
options; `until` and `force` beside it); a custom run submitted from that form, with a tracking field and a plugin option of the
encoder edited, runs in the served process to Completed, both edits reach MLflow, and the flow run page lists the
MLflow link artifacts. Screenshots go to artifacts/browser/; with
VAEFLOW_UPDATE_DOCS=1 the parameter form is also copied to docs/prefect-ui.png and the completed
run to docs/prefect-ui-run.png (for the README).

Needs Playwright (`pip install -e '.[dev]'`) and a system Chromium (`apt-get install chromium`, or set
CHROMIUM=/path/to/chrome); Playwright's own browser download is not used. Without them the test fails, it does not skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, TINY, VAEFLOW
from test_serve import BIN, client_env, free_port, healthy, store, wait_for

ARTIFACTS = ROOT / "artifacts" / "browser"
DOCS_SHOT = ROOT / "docs" / "prefect-ui.png"  # the parameter form
DOCS_RUN_SHOT = ROOT / "docs" / "prefect-ui-run.png"  # the completed flow run
# read at import: the session fixture in conftest strips every VAEFLOW_* variable before the test runs
UPDATE_DOCS = os.environ.get("VAEFLOW_UPDATE_DOCS") == "1"
SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=1", "eval.iwae_k=4",
        "train.progress=false", "tracking.model_name=served-ui"]
FORM_MODEL_NAME = "browser-ui"  # typed into the form's tracking.model_name field; the registered model proves it
FORM_ENCODER_HIDDEN = 96  # typed into model.encoder's `hidden` option (the conv encoder's; 128 in the tiny config)
TIMEOUT_MS = 60_000
FLOW = "vaeflow_pipeline"  # the one pipeline flow; `vaeflow serve --name ui` registers FLOW/ui and FLOW/ui-STAGE


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_browser() -> str:
    """The Chromium executable; fail (not skip) with how to install what is missing."""
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("the Playwright Python package: `.venv/bin/pip install -e '.[dev]'` (or `make install`)")
    chrome = chromium_path()
    if chrome is None:
        missing.append("a system Chromium: `apt-get install -y chromium` as root (or CHROMIUM=/path/to/chrome); "
                       "Playwright's own browser download is not needed")
    if missing:
        pytest.fail("the browser test needs " + " and ".join(missing), pytrace=False)
    return chrome


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """`prefect server start` on a free port, whose UI talks to that port (it defaults to 4200 otherwise)."""
    home = tmp_path_factory.mktemp("prefect-ui-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
           "PREFECT_UI_API_URL": api, "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false", "PREFECT_API_LOG_RETRYABLE_ERRORS": "true"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: healthy(api) or proc.poll() is not None, 180, "prefect server")
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        yield SimpleNamespace(api=api, log=home / "server.log")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def ui_base(api: str) -> str:
    """The UI a fresh browser gets (V2 in Prefect 3.9, served under /v2/), as an absolute URL ending in '/'."""
    origin = api.removesuffix("/api")
    with urllib.request.urlopen(f"{origin}/ui-settings", timeout=10) as r:
        settings = json.load(r)
    assert settings["api_url"] == api, f"the UI would call {settings['api_url']}, not this server ({api})"
    base = settings.get(f"{settings.get('default_ui', 'v1')}_base_url") or "/"
    return origin + "/" + base.strip("/") + ("/" if base.strip("/") else "")


def label(name: str) -> re.Pattern:
    """A form label for a schema field: `batch_size` as 'batch_size', 'Batch Size' or 'Batch Size (Optional)'."""
    return re.compile(r"^\s*" + r"[ _]".join(map(re.escape, name.split("_"))) + r"\b", re.I)


@pytest.mark.slow
def test_prefect_ui_shows_the_config_form_and_runs_the_pipeline(ui_server, tmp_path):
    api = ui_server.api
    chrome = require_browser()
    from playwright.sync_api import expect, sync_playwright
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*"):
        old.unlink()
    project = tmp_path / "project"
    project.mkdir()
    env = client_env(api, project, tmp_path / "client-home")
    args = [VAEFLOW, "serve", str(TINY), *[a for s in SETS for a in ("--set", s)], "--interval", "3600", "--name", "ui",
            "--pin"]  # the resolved config pinned as the `config` default: the form is filled in
    serve_log = tmp_path / "serve.log"
    log = open(serve_log, "w")
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    problems: list[str] = []  # browser console errors, for failure messages

    def tail() -> str:
        return (f"\n--- serve.log ---\n{serve_log.read_text()[-3000:]}\n--- server.log ---\n"
                f"{ui_server.log.read_text()[-3000:]}\n--- browser errors ---\n" + "\n".join(problems[-20:]))

    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            def deployment():
                assert proc.poll() is None, tail()
                try:
                    return client.read_deployment_by_name(f"{FLOW}/ui")
                except Exception:
                    return None

            dep = wait_for(deployment, 180, f"the {FLOW}/ui deployment")
            assert "config:pinned" in dep.tags and "until" not in dep.parameters  # the whole pipeline
            train_defaults = dep.parameters["config"]["train"]
            encoder = dep.parameters["config"]["model"]["encoder"]
            assert encoder["name"] == "conv" and encoder["hidden"] != FORM_ENCODER_HIDDEN
            base = ui_base(api)

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chrome, headless=True,
                                            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
                page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
                try:
                    # 1. the deployment page, as a user opens it
                    page.goto(f"{base}deployments/deployment/{dep.id}", wait_until="networkidle")
                    expect(page.get_by_text(FLOW).first).to_be_visible()  # the flow's name
                    expect(page.get_by_text(re.compile(r"^\s*ui\s*$")).first).to_be_visible()  # deployment name
                    page.screenshot(path=ARTIFACTS / "01-deployment.png", full_page=True)

                    # 2. Run -> Custom run: the parameter form, with config's fields and the resolved defaults
                    page.get_by_role("button", name="Run", exact=True).click()
                    page.get_by_role("menuitem", name="Custom run").or_(
                        page.get_by_text("Custom run", exact=True)).first.click()
                    for field in ("config_path", "until", "force", "config", "epochs", "lr", "batch_size", "channels",
                                  "hidden"):
                        expect(page.get_by_text(label(field)).first, f"form field {field}").to_be_visible()
                    for heading in ("Training", "Model", "Data"):  # section titles, not class names
                        expect(page.get_by_text(label(heading)).first, f"section {heading}").to_be_visible()
                    assert page.get_by_text(re.compile(r"TrainConfig|ComponentSpec|Encoder_conv")).count() == 0
                    # the encoder's plugin tabs: one per registered encoder, the configured one selected
                    for plugin in ("conv", "mlp"):
                        expect(page.get_by_role("tab", name=plugin, exact=True).first).to_be_visible()
                    expect(page.get_by_role("tab", name="conv", exact=True).first).to_have_attribute(
                        "aria-selected", "true")
                    for field in ("epochs", "lr", "batch_size"):  # Training precedes Evaluation (batch_size in both)
                        box = page.get_by_label(label(field)).first
                        assert float(box.input_value()) == float(train_defaults[field]), (field, box.input_value())
                    model_name = page.get_by_label(label("model_name")).first
                    expect(model_name).to_have_value("served-ui")
                    model_name.fill(FORM_MODEL_NAME)
                    # a plugin option: the first `hidden` box is model.encoder's (the encoder precedes the decoder)
                    hidden = page.get_by_label(label("hidden")).first
                    assert int(hidden.input_value()) == encoder["hidden"], hidden.input_value()
                    hidden.fill(str(FORM_ENCODER_HIDDEN))
                    # the Training heading at the top of the viewport, for the picture
                    page.get_by_text(label("Training")).first.evaluate(
                        "e => { e.scrollIntoView({block: 'start'}); window.scrollBy(0, -16); }")
                    page.mouse.move(0, 0)
                    form_shot = ARTIFACTS / "02-custom-run-form.png"
                    page.screenshot(path=form_shot)  # the viewport around Training; the full form is several thousand px
                    page.screenshot(path=ARTIFACTS / "02-custom-run-form-full.png", full_page=True)

                    # 3. submit it: the UI creates the flow run, the served process picks it up
                    # The UI does not retry a 503 (sqlite busy on a loaded machine) the way the Python client does:
                    # it shows an error toast and stays on the form; a user clicks Submit again, and so do we.
                    started = time.time()
                    ok, err = re.compile(r"scheduled to start", re.I), re.compile(r"error while creating", re.I)
                    for attempt in range(1, 4):
                        errors_before = page.get_by_text(err).count()
                        page.get_by_role("button", name="Submit", exact=True).click()
                        expect(page.get_by_text(ok).or_(page.get_by_text(err).nth(errors_before)).first).to_be_visible()
                        if page.get_by_text(ok).count():
                            break
                        problems.append(f"submit {attempt}: the UI could not create the flow run")
                        page.wait_for_timeout(3000)
                    else:
                        raise AssertionError("the UI failed to create the flow run three times" + tail())

                    def ui_runs() -> list:  # the deployment's runs also hold the schedule's future ones
                        runs = client.read_flow_runs(
                            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])), limit=200)
                        return [r for r in runs if (r.parameters.get("config") or {}).get("tracking", {})
                                .get("model_name") == FORM_MODEL_NAME]

                    runs = wait_for(ui_runs, 60, "the flow run submitted from the UI form")
                    assert len(runs) == 1, f"the form created {len(runs)} flow runs" + tail()
                    run = runs[0]
                    assert run.parameters["config"]["train"]["epochs"] == train_defaults["epochs"]
                    assert run.parameters["config"]["model"]["encoder"] == {**encoder, "hidden": FORM_ENCODER_HIDDEN}
                    assert not run.parameters.get("until") and not run.parameters.get("force")  # every stage, cached or not

                    # 4. it runs to Completed
                    try:
                        final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 600,
                                         f"the flow run {run.name} to finish")
                    except AssertionError as e:
                        raise AssertionError(str(e) + tail()) from None
                    assert final.state.is_completed(), f"{final.state.type}: {final.state.message}" + tail()
                    run_seconds = time.time() - started

                    # 5. the flow run page shows it Completed
                    page.goto(f"{base}runs/flow-run/{run.id}", wait_until="networkidle")
                    expect(page.get_by_text(run.name).first).to_be_visible()
                    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
                    page.wait_for_timeout(1500)  # let the run graph settle before the picture
                    run_shot = ARTIFACTS / "03-flow-run-completed.png"
                    page.screenshot(path=run_shot, full_page=True)
                    # the flow run page shows the MLflow link artifacts (one per stage run, the model version)
                    links = [a.key for a in client.read_artifacts(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=[run.id])), limit=100) if (a.key or "").startswith("mlflow")]
                    assert links, "no MLflow link artifact on the flow run" + tail()
                    page.get_by_role("tab", name="Artifacts").first.click()
                    expect(page.get_by_text(re.compile(r"^\s*mlflow-")).first).to_be_visible()
                    page.screenshot(path=ARTIFACTS / "03b-flow-run-artifacts.png", full_page=True)
                    page.goto(f"{base}deployments/deployment/{dep.id}", wait_until="networkidle")
                    expect(page.get_by_text(run.name).first).to_be_visible()
                    page.screenshot(path=ARTIFACTS / "04-deployment-after-run.png", full_page=True)
                except Exception:
                    page.screenshot(path=ARTIFACTS / "failure.png", full_page=True)
                    (ARTIFACTS / "failure.txt").write_text(page.url + "\n\n" + page.inner_text("body") + tail())
                    raise
                finally:
                    browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()

    # the values typed into the form reached the pipeline: the model is registered under that name, and the MLflow
    # run trained the encoder with the edited option
    mlflow_client = store(project)
    versions = mlflow_client.search_model_versions(f"name='{FORM_MODEL_NAME}'")
    assert [int(v.version) for v in versions] == [1]
    params = mlflow_client.get_run(versions[0].run_id).data.params
    if "model.encoder.hidden" not in params:  # the version's run is a stage run: its parent holds the config params
        params = mlflow_client.get_run(mlflow_client.get_run(versions[0].run_id).data.tags["mlflow.parentRunId"]).data.params
    assert params["model.encoder.hidden"] == str(FORM_ENCODER_HIDDEN) and params["model.decoder.hidden"] == str(
        encoder["hidden"]), params
    print(f"UI-submitted flow run completed in {run_seconds:.0f} s; screenshots in {ARTIFACTS}")
    if UPDATE_DOCS:
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(form_shot, DOCS_SHOT)
        shutil.copyfile(run_shot, DOCS_RUN_SHOT)
