"""`vaeflow deploy` to a Prefect process work pool, run by real `prefect worker start` processes.

Every deployment is one of the single pipeline flow (`vaeflow_pipeline`, pipelines/pipeline.py:pipeline): NAME runs
the whole stage graph, NAME-STAGE a stage and what it needs (`until`). A real `prefect server` on PostgreSQL and a
real `mlflow server` (tests/servers.py, via conftest fixtures); two workers in their own process groups; four runs
submitted through the API with different overrides (and one with an edited plugin option in the structured `config`)
reach Completed, spread over both workers, and register versions 1..4 of one model. The deployment reads its YAML at
run time (an edit after deploying shows in the registered model name), and its parameter form is built from the
discovered plugins and the config's stage graph (checked on the schema the API returns).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, TINY, VAEFLOW
from test_serve import BIN, wait_for

TINY_VQ = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"
# tiny runs: two of them share the 2 cores at a time, one thread each
SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=1", "eval.iwae_k=4",
        "train.progress=false", "train.num_threads=1", "quality.samples=64", "quality.feature_epochs=1"]
FORBIDDEN = ("ComponentSpec", "after discovery", "replaced by a union", "union of plugin option models")
FLOW = "vaeflow_pipeline"  # the one pipeline flow every deployment runs
ENTRYPOINT = "pipelines/pipeline.py:pipeline"
# the stage names of each graph, in run order (train_prior: the expanded stage, one run per code level)
STAGES = {False: ["prepare_data", "train", "train_features", "evaluate", "render", "register"],
          True: ["prepare_data", "train", "extract_codes", "train_prior", "sample", "train_features", "evaluate",
                 "render", "register"]}


def deployment_names(name: str, vq: bool) -> list[str]:
    """The deployments `vaeflow deploy/serve --name NAME` registers: NAME (the whole pipeline), then NAME-STAGE for
    every stage but the last (the whole pipeline ends there)."""
    return [name] + [f"{name}-{stage}" for stage in STAGES[vq][:-1]]


# --- what a form must look like (also used by test_serve) -------------------------------------
def resolve(schema: dict, node: dict) -> dict:
    """A schema node with its `$ref` (or its Optional's non-null member) followed."""
    if "anyOf" in node:
        node = next(m for m in node["anyOf"] if m.get("type") != "null")
    ref = node.get("$ref")
    return schema["definitions"][ref.rsplit("/", 1)[-1]] if ref else node


def branches(schema: dict, node: dict) -> dict[str, dict]:
    """{plugin name: branch definition} of a plugin union (optional and list-of unions included)."""
    node = node.get("items", node)
    if "anyOf" in node:
        node = next(m for m in node["anyOf"] if m.get("type") != "null")
    refs = node.get("oneOf", [node])
    out = {}
    for ref in refs:
        d = resolve(schema, ref)
        out[d["properties"]["name"]["const"]] = d
    return out


def check_form(schema: dict, vq: bool) -> None:
    """The parameter form of a deployment: plugin unions with their options, human titles, no internal wording,
    only the sections of its model family."""
    from vaeflow.core.registry import get_registry

    text = json.dumps(schema)
    for words in FORBIDDEN:
        assert words not in text, f"the form shows internal wording {words!r}"
    props = schema["properties"]
    assert "read at run time unless `config` is set" in props["config_path"]["description"]
    # until and force are optional, their choices the stage names of the config's graph (force: also "all")
    assert set(props) == {"config_path", "overrides", "until", "config", "force"}, sorted(props)
    for param, choices in (("until", STAGES[vq]), ("force", [*STAGES[vq], "all"])):
        assert props[param].get("default") is None and {"type": "null"} in props[param]["anyOf"], props[param]
        (branch,) = [m for m in props[param]["anyOf"] if m.get("type") != "null"]
        assert (branch if param == "until" else branch["items"]) == {"type": "string", "enum": choices}, branch
        assert props[param].get("description"), param
    root = resolve(schema, props["config"])
    sections = {k: resolve(schema, v) for k, v in root["properties"].items()}
    model_node = root["properties"]["model"]  # a tab per model kind with the config's kind of latents, its own first
    kinds = {}
    for ref in model_node.get("oneOf", [model_node]):
        member = resolve(schema, ref)
        kinds[member["properties"]["kind"]["const"]] = member
        assert member["title"] == member["properties"]["kind"]["default"] and member.get("description")
    model = next(iter(kinds.values()))["properties"]
    registry = get_registry()
    unions = {"encoder": model["encoder"], "decoder": model["decoder"], "likelihood": model["likelihood"],
              "dataset": sections["data"]["properties"]["dataset"],
              "renderer": sections["render"]["properties"]["renderers"]}
    if vq:
        unions.update(quantizer=model["quantizer"], prior=sections["prior"]["properties"]["top"])
    else:
        unions["noise"] = kinds["dae"]["properties"]["noise"]
    for family, node in unions.items():
        found = branches(schema, node)
        assert sorted(found) == registry.names(family), (family, sorted(found))
        for name, branch in found.items():
            options = registry.get(family, name).cls.Options.model_fields
            assert branch["title"] == name and branch.get("description"), (family, name, branch.get("title"))
            assert set(branch["properties"]) == set(options) | {"name"}, (family, name)
            assert branch["properties"]["name"]["default"] == name  # a new tab in the UI gets its tag
            for field, info in options.items():
                shown = branch["properties"][field]
                assert shown["title"] and "_" not in shown["title"], (family, name, field, shown["title"])
                if info.description:
                    assert shown["description"] == info.description
                if not info.is_required() and info.default_factory is None:
                    assert shown["default"] == json.loads(json.dumps(info.default)), (family, name, field)
    conv = branches(schema, model["encoder"])["conv"]["properties"]
    assert conv["channels"]["type"] == "array" and conv["hidden"]["type"] == "integer"
    for d in schema["definitions"].values():  # human titles: no class names like Encoder_conv or TrainConfig
        assert "_" not in d["title"] and not d["title"].endswith("Config"), d["title"]
    assert resolve(schema, root["properties"]["train"])["title"] == "Training"
    assert "schedules" not in root["properties"]
    if vq:
        assert list(kinds) == ["vqvae2", "vqvae"]
        assert {"quantizer", "vq"} <= set(model) and "prior" in root["properties"]
        assert not {"latent_dim", "noise"} & set(model)
        assert resolve(schema, model["vq"])["title"] == "VQ architecture"
    else:
        continuous = ["vae", "ae", "beta-tcvae", "dae", "factor-vae", "info-vae", "iwae", "wae-mmd"]
        assert list(kinds) == continuous  # the config's own kind first, then the other continuous kinds
        assert "latent_dim" in model and "noise" not in model and "noise" in kinds["dae"]["properties"]
        assert not {"quantizer", "vq"} & set(model) and "prior" not in root["properties"]


# --- without a server ------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY_VQ], ids=["vae", "vq"])
def test_form_accepts_the_resolved_config_and_edits_and_rejects_typos(config):
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from vaeflow.core.config import ScheduleConfig, load_config
    from vaeflow.pipelines.deployments import deployment_specs, form_value
    from vaeflow.pipelines.pipeline import pipeline

    cfg = load_config(config)
    vq = cfg.model.kind.startswith("vq")
    every_hour = [ScheduleConfig(interval_seconds=3600)]
    for pin in (False, True):
        specs = deployment_specs(config, ["train.epochs=1"], cfg, every_hour, pin, "tiny")
        # one flow; the whole pipeline first, then a deployment per stage but the last (VAE 6, VQ 9)
        assert len(specs) == (9 if vq else 6)
        assert [s["name"] for s in specs] == deployment_names("tiny", vq)
        assert all(s["flow_name"] == FLOW and s["entrypoint"] == ENTRYPOINT and s["flow"] is pipeline for s in specs)
        params = specs[0]["parameters"]
        assert (params["config"] is not None) == pin and params["overrides"] == ([] if pin else ["train.epochs=1"])
        assert "until" not in params and "force" not in params  # the whole pipeline, nothing forced
        for spec, until in zip(specs, [None, *STAGES[vq][:-1]]):
            check_form(spec["schema"], vq)
            mode = f"config:{'pinned' if pin else 'runtime'}"
            assert spec["tags"] == ["vaeflow", mode, f"kind:{cfg.model.kind}"] + ([f"stage:{until}"] if until else [])
            assert ("pinned" if pin else "read from") in spec["description"]
            assert spec["parameters"] == (params if until is None else {**params, "until": until})
            assert len(spec["schedules"]) == (1 if until is None else 0)  # only the whole pipeline is scheduled
            validate(spec["parameters"], spec["schema"], raise_on_error=True)  # each default passes its own form
    schema = specs[0]["schema"]
    value = form_value(cfg)
    value["model"]["encoder"]["activation"] = "silu"  # an edited plugin option passes, as the server checks it
    validate({"config_path": str(config), "config": value}, schema, raise_on_error=True)
    value["model"]["encoder"]["no_such_option"] = 1
    with pytest.raises(ValidationError):
        validate({"config_path": str(config), "config": value}, schema, raise_on_error=True)
    # until and force take the graph's stage names (force also "all"), nothing else
    stage = "train_prior" if vq else "render"
    validate({"config_path": str(config), "until": stage, "force": ["train", "all"]}, schema, raise_on_error=True)
    for bad in ({"until": "no_such_stage"}, {"until": "extract_codes" if not vq else "train_flow"},
                {"force": ["no_such_stage"]}, {"until": "all"}):
        with pytest.raises(ValidationError):
            validate({"config_path": str(config), **bad}, schema, raise_on_error=True)


def test_worker_env_carries_the_workspace_store_and_settings(tmp_path):
    from vaeflow.pipelines.deployments import worker_env

    env = worker_env(tmp_path / "ws", {"EXTRA": "1"},
                     environ={"VAEFLOW_DATA_DIR": "/data", "VAEFLOW_TRAIN__EPOCHS": "2", "HOME": "/root"})
    assert env["VAEFLOW_HOME"] == str((tmp_path / "ws").resolve())
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{(tmp_path / 'ws').resolve() / 'mlflow.db'}"
    assert env["VAEFLOW_DATA_DIR"] == "/data" and env["VAEFLOW_TRAIN__EPOCHS"] == "2" and "HOME" not in env
    assert env["DO_NOT_TRACK"] == "true" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["EXTRA"] == "1"
    assert "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env  # the flow run's `import vaeflow` sets it
    assert "GOMP_SPINCOUNT" not in worker_env(tmp_path, environ={"GOMP_SPINCOUNT": "1000"})  # vaeflow's own default
    waiting = worker_env(tmp_path, environ={"GOMP_SPINCOUNT": "20000", "OMP_WAIT_POLICY": "PASSIVE"})
    assert (waiting["GOMP_SPINCOUNT"], waiting["OMP_WAIT_POLICY"]) == ("20000", "PASSIVE")  # the deployer's choice
    assert worker_env(tmp_path, environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})["MLFLOW_TRACKING_URI"] == \
        "http://mlflow:5000"


def test_deploy_without_a_server_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    r = subprocess.run([VAEFLOW, "deploy", str(TINY), "--pool", "p"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "needs a Prefect server" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_deploy_of_a_template_name_hands_the_runs_the_shipped_file(prefect_pg_server, tmp_path):
    """`vaeflow deploy vae-shapes-tiny` (a template name, as `vaeflow run` takes): the deployment's runs read the
    shipped template, not a file of that name in the folder deploy ran from."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vaeflow.core.config import templates

    tag = uuid.uuid4().hex[:8]
    env = {**os.environ, "PREFECT_API_URL": prefect_pg_server, "PREFECT_HOME": str(tmp_path / "client-home")}
    r = subprocess.run([VAEFLOW, "deploy", "vae-shapes-tiny", "--pool", f"tmpl-{tag}", "--name", f"tmpl-{tag}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    shipped = str(templates()["vae-shapes-tiny"].resolve())
    assert f"each run reads {shipped} when it starts" in r.stdout
    with temporary_settings({PREFECT_API_URL: prefect_pg_server}), get_client(sync_client=True) as client:
        assert client.read_deployment_by_name(f"{FLOW}/tmpl-{tag}").parameters["config_path"] == shipped


# --- the real thing --------------------------------------------------------------------------
def start_worker(pool: str, name: str, env: dict, log: Path) -> subprocess.Popen:
    """`prefect worker start` in its own process group, one flow run at a time."""
    out = open(log, "w")
    try:
        return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()  # the child keeps its own descriptor


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deploy_runs_on_two_workers_and_reads_the_config_at_run_time(prefect_pg_server, mlflow_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vaeflow.core.config import load_config
    from vaeflow.pipelines.deployments import form_value

    api, tag = prefect_pg_server, uuid.uuid4().hex[:8]
    pool, model_name, name = f"vaeflow-{tag}", f"deployed-{tag}", f"tiny-{tag}"  # the server is shared by the session
    workspace = tmp_path / "workspace"
    config = tmp_path / "tiny.yaml"  # a copy: edited after deploying
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["model_name"] = f"{model_name}-as-deployed"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home"),
           "MLFLOW_TRACKING_URI": mlflow_server.uri}
    env.pop("VAEFLOW_HOME", None)
    logs = {"deploy": tmp_path / "deploy.log", "w1": tmp_path / "worker-1.log", "w2": tmp_path / "worker-2.log"}

    def tail() -> str:
        return "".join(f"\n--- {k} ---\n{p.read_text(errors='replace')[-3000:]}" for k, p in logs.items() if p.exists())

    started = time.time()
    r = subprocess.run([VAEFLOW, "deploy", str(config), "--pool", pool, "--name", name, "--workspace", str(workspace),
                        *[a for s in SETS for a in ("--set", s)]],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs["deploy"].write_text(r.stdout + r.stderr)
    assert r.returncode == 0, tail()
    assert f"created work pool {pool!r} (type process)" in r.stdout
    assert f"  prefect worker start --pool {pool}\n" in r.stdout and f"  prefect deployment run {FLOW}/{name}\n" in r.stdout
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith(f"  {FLOW}/")]
    assert listed == [f"{FLOW}/{n}" for n in deployment_names(name, vq=False)], r.stdout  # every deployment it made
    deploy_seconds = time.time() - started

    workers_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    workers_env.pop("MLFLOW_TRACKING_URI")  # the deployment's job variables carry it
    workers = {}
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"{FLOW}/{name}")
            assert dep.work_pool_name == pool and client.read_work_pool(pool).type == "process"
            assert dep.entrypoint == ENTRYPOINT
            assert {"vaeflow", "config:runtime", "kind:vae"} <= set(dep.tags) and "read from" in dep.description
            assert not any(t.startswith("stage:") for t in dep.tags)
            assert dep.parameters == {"config_path": str(config), "overrides": SETS, "config": None}
            job_env = dep.job_variables["env"]
            assert job_env["VAEFLOW_HOME"] == str(workspace) and job_env["MLFLOW_TRACKING_URI"] == mlflow_server.uri
            assert job_env["DO_NOT_TRACK"] == "true" and job_env["VAEFLOW_DATA_DIR"] == os.environ["VAEFLOW_DATA_DIR"]
            check_form(dep.parameter_openapi_schema, vq=False)
            for stage in STAGES[False][:-1]:  # a deployment per stage, of the same flow, stopping there
                staged = client.read_deployment_by_name(f"{FLOW}/{name}-{stage}")
                assert staged.work_pool_name == pool and staged.flow_id == dep.flow_id
                assert staged.entrypoint == ENTRYPOINT and f"stage:{stage}" in staged.tags
                assert staged.parameters == {**dep.parameters, "until": stage}
            with pytest.raises(ObjectNotFound):  # the last stage's deployment is the whole pipeline
                client.read_deployment_by_name(f"{FLOW}/{name}-register")

            # the file is read when a run starts: this edit, made after deploying, names the registered model
            raw["tracking"]["model_name"] = model_name
            config.write_text(yaml.safe_dump(raw))

            for worker in ("w1", "w2"):
                workers[worker] = start_worker(pool, worker, workers_env, logs[worker])

            def online() -> bool:
                assert all(p.poll() is None for p in workers.values()), tail()
                found = client.read_workers_for_work_pool(
                    pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
                return {w.name for w in found} == {"w1", "w2"}

            wait_for(online, 180, "both workers online")
            # four runs with different seeds; the last one through the structured `config` with an edited plugin
            # option, which the server validates against the form
            edited = form_value(load_config(config, SETS + ["train.seed=3"]))
            edited["model"]["encoder"]["channels"] = [8, 16]
            runs = [client.create_flow_run_from_deployment(dep.id, parameters={"overrides": SETS + [f"train.seed={i}"]})
                    for i in range(3)]
            runs.append(client.create_flow_run_from_deployment(dep.id, parameters={"overrides": [], "config": edited}))

            def finished():
                states = [client.read_flow_run(run.id) for run in runs]
                return all(s.state.is_final() for s in states) and states

            try:
                final = wait_for(finished, 1200, "four flow runs to finish")
            except AssertionError as e:
                raise AssertionError(str(e) + tail()) from None
            bad = [(f.name, f.state.type, f.state.message) for f in final if not f.state.is_completed()]
            assert not bad, f"{bad}{tail()}"
            ran_on = [f.labels.get("prefect.worker.name") for f in final]
            assert set(ran_on) == {"w1", "w2"}, f"runs per worker: {ran_on}"
            # the same deployment form for a VQ config, pinned this time
            r = subprocess.run([VAEFLOW, "deploy", str(TINY_VQ), "--pool", pool, "--name", f"{name}-vq", "--pin",
                                "--workspace", str(workspace)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, r.stdout + r.stderr
            vq = client.read_deployment_by_name(f"{FLOW}/{name}-vq")
            assert vq.flow_id == dep.flow_id and vq.entrypoint == ENTRYPOINT
            assert {"config:pinned", "kind:vqvae2"} <= set(vq.tags) and vq.parameters["config"]["model"]["kind"] == "vqvae2"
            check_form(vq.parameter_openapi_schema, vq=True)
            for stage in STAGES[True][:-1]:  # the VQ graph's stages, train_prior by its name
                staged = client.read_deployment_by_name(f"{FLOW}/{name}-vq-{stage}")
                assert staged.parameters == {**vq.parameters, "until": stage} and f"stage:{stage}" in staged.tags
    finally:
        for proc in workers.values():
            stop(proc)

    mlflow = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    versions = sorted(int(v.version) for v in mlflow.search_model_versions(f"name='{model_name}'"))
    assert versions == [1, 2, 3, 4], versions  # no gaps, no duplicates
    assert not mlflow.search_model_versions(f"name='{model_name}-as-deployed'")
    exp = mlflow.get_experiment_by_name("vaeflow")
    parents = mlflow.search_runs([exp.experiment_id], f"params.`tracking.model_name` = '{model_name}' and "
                                                     f"tags.`mlflow.runName` LIKE '{FLOW}%'")
    assert len(parents) == 4 and all(p.info.status == "FINISHED" for p in parents)
    # whole-pipeline runs: named `vaeflow_pipeline <config stem>`, no `until`, nothing forced
    assert {p.data.tags["mlflow.runName"] for p in parents} == {f"{FLOW} {config.stem}"}
    assert all(p.data.tags["vaeflow.until"] == "" and p.data.tags["vaeflow.force"] == "" for p in parents)
    by_seed = {p.data.params["train.seed"]: p.data.params for p in parents}
    assert sorted(by_seed) == ["0", "1", "2", "3"]
    assert by_seed["3"]["model.encoder.channels"] == "[8, 16]" and by_seed["0"]["model.encoder.channels"] == "[16, 32]"
    assert by_seed["0"]["train.epochs"] == "1"  # the deployment's overrides applied
    print(f"deploy took {deploy_seconds:.0f} s; four runs on {sorted(set(ran_on))} in {time.time() - started:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_worker_killed_mid_training_crashes_its_run_and_a_resubmission_resumes(prefect_pg_server, tmp_path):
    """kill -9 of a worker running the NAME-train deployment (until train): its flow run ends Crashed (the run process
    notices its parent died), the run's MLflow runs end KILLED, and the same run submitted again on another worker
    resumes from the checkpoint in the shared workspace, with the weights of an uninterrupted run."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from vaeflow.core.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, read_metrics
    from vaeflow.core.config import load_config
    from vaeflow.core.engine import Trainer
    from vaeflow.core.manifest import load_prepared

    api, tag = prefect_pg_server, uuid.uuid4().hex[:8]
    pool, name = f"vaeflow-kill-{tag}", f"kill-{tag}"
    workspace = tmp_path / "workspace"
    sets = [*SETS, "data.dataset.n_train=2048", "train.epochs=2", "train.checkpoint_every=2",
            f"tracking.model_name=killed-{tag}"]
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "client-home")}
    for var in ("VAEFLOW_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    r = subprocess.run([VAEFLOW, "deploy", str(TINY), "--pool", pool, "--name", name, "--workspace", str(workspace),
                        *[a for s in sets for a in ("--set", s)]], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    workers_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    logs = {w: tmp_path / f"{w}.log" for w in ("w1", "w2")}

    def tail() -> str:
        return "".join(f"\n--- {k} ---\n{p.read_text(errors='replace')[-3000:]}" for k, p in logs.items() if p.exists())

    def checkpoint():
        found = list((workspace / ".vaeflow" / "train").glob(f"*/{CHECKPOINT_FILE}"))
        return found[0] if found else None

    workers = {"w1": start_worker(pool, "w1", workers_env, logs["w1"])}
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"{FLOW}/{name}-train")
            assert dep.parameters["until"] == "train"
            first = client.create_flow_run_from_deployment(dep.id)
            ckpt = wait_for(lambda: checkpoint() or (client.read_flow_run(first.id).state.is_final() and
                                                     pytest.fail(f"finished before the kill{tail()}")), 600,
                            "a training checkpoint")
            os.kill(workers["w1"].pid, signal.SIGKILL)  # the worker process alone, as a crash of it would
            workers["w1"].wait()
            crashed = wait_for(lambda: (fr := client.read_flow_run(first.id)).state.is_final() and fr, 120,
                               "the orphaned flow run to end")
            assert crashed.state.is_crashed(), (crashed.state, tail())

            workers["w2"] = start_worker(pool, "w2", workers_env, logs["w2"])
            second = client.create_flow_run_from_deployment(dep.id)
            done = wait_for(lambda: (fr := client.read_flow_run(second.id)).state.is_final() and fr, 900,
                            "the resubmitted run")
            assert done.state.is_completed(), (done.state, tail())
            assert done.labels.get("prefect.worker.name") == "w2"
    finally:
        for proc in workers.values():
            stop(proc)

    store = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    exp = store.get_experiment_by_name("vaeflow")
    runs = store.search_runs([exp.experiment_id], "")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = {r.data.tags["mlflow.runName"].split()[0] for r in runs if r.info.status == "KILLED"}
    assert killed == {f"{FLOW}[train]", "train"}  # the parent run (until train) and its train stage
    assert {r.data.tags["mlflow.runName"].split()[0] for r in runs} == {f"{FLOW}[train]", "prepare_data", "train"}
    run_dir = ckpt.parents[len(Path(CHECKPOINT_FILE).parts) - 1]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    cfg = load_config(TINY, sets)
    data = next((workspace / ".vaeflow" / "data").iterdir())
    Trainer(cfg, tmp_path / "uninterrupted", train_images=load_prepared(data)["train"]).fit()
    assert (run_dir / WEIGHTS_FILE).read_bytes() == (tmp_path / "uninterrupted" / WEIGHTS_FILE).read_bytes()
