"""Deployments served to a real `prefect server` (the YAML read at run time, the plugin-aware form; every deployment
one of the single `vaeflow_pipeline` flow, NAME-STAGE stopping at its stage), and concurrent pipeline runs into one
sqlite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, TINY, VAEFLOW

BIN = Path(sys.executable).parent
SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=1", "eval.iwae_k=4",
        "train.progress=false", "tracking.model_name=served"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(prefect_pg_server):
    """The API URL of a real `prefect server` (on PostgreSQL, shared by the session: deployment names are unique)."""
    return prefect_pg_server


def store(project: Path) -> MlflowClient:
    """A client for a project's sqlite store, registry included (never the process-wide default)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def client_env(api: str, project: Path, home: Path) -> dict:
    env = {**os.environ, "PREFECT_API_URL": api, "VAEFLOW_HOME": str(project), "PREFECT_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_served_deployment_reads_its_config_at_run_time_and_keeps_its_schedule(server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from test_deploy import ENTRYPOINT, FLOW, STAGES, check_form

    project = tmp_path / "project"
    project.mkdir()
    name, model = f"tiny-{uuid.uuid4().hex[:8]}", "served"
    config = tmp_path / "tiny.yaml"  # a copy, edited after serving
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["model_name"] = "served-as-deployed"
    config.write_text(yaml.safe_dump(raw))
    sets = [s for s in SETS if not s.startswith("tracking.model_name=")]
    env = client_env(server, project, tmp_path / "client-home")
    args = [VAEFLOW, "serve", str(config), *[a for s in sets for a in ("--set", s)], "--interval", "3600", "--name", name]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(args, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
            def deployment(full_name: str):
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    return client.read_deployment_by_name(full_name)
                except Exception:
                    return None

            stages = STAGES[False][:-1]  # a deployment per stage but the last (register: the whole pipeline)
            for stage in stages:  # serve registers them one after another
                wait_for(lambda: deployment(f"{FLOW}/{name}-{stage}"), 120, f"the {name}-{stage} deployment")
            dep = wait_for(lambda: deployment(f"{FLOW}/{name}"), 120, f"the {FLOW}/{name} deployment")
            # a served flow's entrypoint is its file relative to the serving process's folder
            path, function = dep.entrypoint.rsplit(":", 1)
            assert (project / path).resolve() == ROOT / ENTRYPOINT.split(":")[0] and function == "pipeline"
            assert {"config:runtime", "kind:vae"} <= set(dep.tags)
            assert deployment(f"{FLOW}/{name}-register") is None  # no deployment for the last stage
            # the schedule is visible through the API
            assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [3600.0]
            # without --pin the file is read when the run starts: config is None, the overrides are the --set values
            assert dep.parameters == {"config_path": str(config), "overrides": sets, "config": None}
            assert "config:runtime" in dep.tags and "when each run starts" in dep.description
            check_form(dep.parameter_openapi_schema, vq=False)  # what the UI renders as the form
            for stage in stages:  # the same flow, stopping at its stage, never scheduled (only the pipeline is)
                staged = deployment(f"{FLOW}/{name}-{stage}")
                assert staged.flow_id == dep.flow_id and not staged.schedules and f"stage:{stage}" in staged.tags
                assert staged.parameters == {**dep.parameters, "until": stage}
                check_form(staged.parameter_openapi_schema, vq=False)
            raw["tracking"]["model_name"] = model  # edited after serving: the run must see it
            config.write_text(yaml.safe_dump(raw))
            # launch it the way the UI does, and wait for the served process to run it
            run = client.create_flow_run_from_deployment(dep.id)
            final = wait_for(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 300, "the flow run")
            assert final.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    mlflow_client = store(project)
    exp = mlflow_client.get_experiment_by_name("vaeflow")
    parents = mlflow_client.search_runs([exp.experiment_id], "tags.`mlflow.runName` LIKE 'vaeflow_pipeline%'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["mlflow.runName"] == f"vaeflow_pipeline {config.stem}"  # the whole pipeline
    assert parents[0].data.tags["vaeflow.until"] == "" and parents[0].data.tags["vaeflow.force"] == ""
    assert parents[0].data.params["tracking.model_name"] == model and parents[0].data.params["train.epochs"] == "1"
    assert [int(v.version) for v in mlflow_client.search_model_versions(f"name='{model}'")] == [1]
    assert not mlflow_client.search_model_versions("name='served-as-deployed'")


def test_four_concurrent_runs_lose_nothing(server, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    env = client_env(server, project, tmp_path / "client-home")
    procs = []
    for seed in range(4):
        sets = SETS + [f"train.seed={seed}", "tracking.model_name=concurrent"]
        args = [VAEFLOW, "run", str(TINY), *[a for s in sets for a in ("--set", s)]]
        procs.append(subprocess.Popen(args, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
        assert "database is locked" not in out
    c = store(project)
    exp = c.get_experiment_by_name("vaeflow")
    parents = c.search_runs([exp.experiment_id], "tags.`mlflow.runName` LIKE 'vaeflow_pipeline%'")
    assert len(parents) == 4 and all(r.info.status == "FINISHED" for r in parents)
    assert {r.data.tags["mlflow.runName"] for r in parents} == {f"vaeflow_pipeline {TINY.stem}"}
    assert sorted(r.data.params["train.seed"] for r in parents) == ["0", "1", "2", "3"]
    versions = sorted(int(v.version) for v in c.search_model_versions("name='concurrent'"))
    assert versions == [1, 2, 3, 4]  # no gaps, no duplicates
