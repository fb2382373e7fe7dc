"""The team setup for real: `mlflow server` and `prefect server` on PostgreSQL as local processes (tests/servers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from uuid import UUID

import psycopg2
from mlflow.tracking import MlflowClient

from servers import with_driver
from test_serve import wait_for

LOG_MODEL = textwrap.dedent("""
    import json, sys
    import mlflow

    class Double(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input * 2

    with mlflow.start_run(run_id=sys.argv[1]):
        info = mlflow.pyfunc.log_model(name="model", python_model=Double(), pip_requirements=[])
    print(json.dumps({"model_uri": info.model_uri, "model_id": info.model_id}))
""")

FLOW = textwrap.dedent("""
    import json
    from prefect import flow, task

    @task
    def add(x: int, y: int) -> int:
        return x + y

    @flow
    def servers_check(x: int) -> int:
        return add(x, 1)

    state = servers_check(41, return_state=True)
    print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "result": state.result()}))
""")


def query(db_url: str, sql: str, *params) -> list[tuple]:
    """The rows of one SQL query against a PostgreSQL database."""
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def run_python(code: str, env: dict, *args: str) -> str:
    """Run Python code in a fresh process with extra environment variables; return its last line of output."""
    out = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def test_with_driver_names_the_installed_drivers():
    assert with_driver("postgresql://u@h:1/db", "psycopg2") == "postgresql+psycopg2://u@h:1/db"
    assert with_driver("postgres://u@h:1/db", "asyncpg") == "postgresql+asyncpg://u@h:1/db"
    assert with_driver("postgresql+psycopg://u@h:1/db", "asyncpg") == "postgresql+asyncpg://u@h:1/db"


def test_mlflow_server_on_postgres_tracks_proxies_artifacts_and_registers(mlflow_server, tmp_path):
    import mlflow
    import pandas as pd

    c = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    exp_id = c.create_experiment("servers-check")
    assert c.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    run_id = c.create_run(exp_id).info.run_id
    c.log_param(run_id, "lr", "0.001")
    for step, loss in enumerate([3.0, 2.0, 1.5]):
        c.log_metric(run_id, "loss", loss, step=step)
    note = tmp_path / "note.txt"
    note.write_text("uploaded over HTTP")
    c.log_artifact(run_id, str(note), artifact_path="notes")
    # the upload went through the server into its --artifacts-destination, at <experiment>/<run>/artifacts/...
    landed = mlflow_server.artifacts / exp_id / run_id / "artifacts" / "notes" / "note.txt"
    assert landed.read_text() == "uploaded over HTTP"

    # an MLflow 3 logged model (it has an id), logged by another process through the server
    info = json.loads(run_python(LOG_MODEL, {"MLFLOW_TRACKING_URI": mlflow_server.uri}, run_id))
    c.set_terminated(run_id)
    assert (mlflow_server.artifacts / exp_id / "models" / info["model_id"] / "artifacts" / "MLmodel").is_file()
    c.create_registered_model("servers-double")
    mv = c.create_model_version("servers-double", source=info["model_uri"], run_id=run_id, model_id=info["model_id"])
    assert mv.version == "1"

    # read back through the server
    got = c.get_model_version("servers-double", "1")
    # (the SQL registry keeps no model_id column: the link to the logged model is the models:/m-... source)
    assert (got.run_id, got.status, got.source) == (run_id, "READY", info["model_uri"])
    assert c.get_logged_model(info["model_id"]).source_run_id == run_id
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.001"} and run.data.metrics == {"loss": 1.5}
    assert [m.value for m in c.get_metric_history(run_id, "loss")] == [3.0, 2.0, 1.5]
    local = mlflow.artifacts.download_artifacts(c.get_model_version_download_uri("servers-double", "1"),
                                                dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server.uri)
    predicted = mlflow.pyfunc.load_model(local).predict(pd.DataFrame({"x": [1.0, 2.5]}))
    assert predicted["x"].tolist() == [2.0, 5.0]

    # and it all lives in PostgreSQL
    assert query(mlflow_server.db, "SELECT run_uuid, status FROM runs WHERE experiment_id = %s", int(exp_id)) \
        == [(run_id, "FINISHED")]
    assert query(mlflow_server.db, "SELECT count(*) FROM metrics WHERE run_uuid = %s", run_id) == [(3,)]
    assert query(mlflow_server.db, "SELECT version, run_id FROM model_versions WHERE name = %s",
                 "servers-double") == [(1, run_id)]


def test_prefect_server_on_postgres_runs_a_flow_to_completed(prefect_pg_server, prefect_pg_db, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {"PREFECT_API_URL": prefect_pg_server, "PREFECT_HOME": str(tmp_path / "client-home")}
    out = json.loads(run_python(FLOW, env))
    assert out["result"] == 42
    run_id = UUID(out["flow_run_id"])

    with temporary_settings({PREFECT_API_URL: prefect_pg_server}), get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed(), run.state
        assert client.read_flow(run.flow_id).name == "servers-check"

    # the server wrote to PostgreSQL; task runs arrive through its event pipeline, so a little later
    assert query(prefect_pg_db, "SELECT state_type FROM flow_run WHERE id = %s::uuid", str(run_id)) == [("COMPLETED",)]
    def task_run_completed() -> bool:
        rows = query(prefect_pg_db, "SELECT state_type FROM task_run WHERE flow_run_id = %s::uuid", str(run_id))
        return rows == [("COMPLETED",)]

    wait_for(task_run_completed, 60, "the flow's task run to reach PostgreSQL as COMPLETED")
