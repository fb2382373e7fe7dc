"""Test isolation: no user plugins or VAEFLOW_* settings leak in; data caches go to a temp folder."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from vaeflow.core.registry import reset_registry

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vae-shapes-tiny.yaml"
VAEFLOW = str(Path(sys.executable).parent / "vaeflow")


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """Strip VAEFLOW_* variables, silence telemetry, keep data caches out of $HOME."""
    for var in [v for v in os.environ if v.startswith("VAEFLOW_")]:
        del os.environ[var]
    os.environ["VAEFLOW_DATA_DIR"] = str(tmp_path_factory.mktemp("data-cache"))
    os.environ["VAEFLOW_CACHE_DIR"] = str(tmp_path_factory.mktemp("vaeflow-cache"))  # the plugin listing cache
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def local_plugins(tmp_path, monkeypatch):
    """Write plugin modules into a temp folder and load them through VAEFLOW_PLUGINS; unloaded afterwards.

    Usage: local_plugins({"my_plugin": "source code"}) -> the fresh Registry.
    """
    written: list[str] = []

    def load(modules: dict[str, str]):
        from vaeflow.core.registry import get_registry

        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
            written.append(name)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setenv("VAEFLOW_PLUGINS", ",".join(modules))
        reset_registry()
        return get_registry()

    try:
        yield load
    finally:
        for name in written:
            sys.modules.pop(name, None)
        monkeypatch.delenv("VAEFLOW_PLUGINS", raising=False)
        reset_registry()


class CrashAt:
    """Engine callback that raises at a step, simulating a crash mid-run (checkpoints before it survive)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, step, record):
        if step >= self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def home(tmp_path_factory, request):
    """A project folder per test module holding mlflow.db, mlartifacts/ and .vaeflow/, with a Prefect test server."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))
    mp = pytest.MonkeyPatch()
    mp.setenv("VAEFLOW_HOME", str(root))
    mp.chdir(root)
    with prefect_test_harness(server_startup_timeout=120):
        yield root
    mp.undo()


# Real servers (tests/servers.py), started lazily: only the tests that ask for them pay the start-up.
_PG_URL = os.environ.get("VAEFLOW_TEST_PG_URL")  # read at import: _isolated_env strips VAEFLOW_* at session start


@pytest.fixture(scope="session")
def pg_url():
    """Base URL of a PostgreSQL cluster: $VAEFLOW_TEST_PG_URL (CI starts one), else a throwaway one for the session."""
    from servers import postgres

    with postgres(_PG_URL) as url:
        yield url


@pytest.fixture(scope="session")
def mlflow_server(pg_url, tmp_path_factory):
    """`mlflow server` on a fresh PostgreSQL database, proxying artifacts to disk: .uri, .artifacts, .db."""
    from servers import MlflowServer, fresh_database
    from servers import mlflow_server as serve

    db = fresh_database(pg_url, "mlflow")
    artifacts = tmp_path_factory.mktemp("mlflow-server") / "artifacts"
    with serve(db, artifacts) as uri:
        yield MlflowServer(uri, artifacts, db)


@pytest.fixture(scope="session")
def prefect_pg_db(pg_url):
    """A fresh PostgreSQL database for the Prefect server (its URL, for checking what the server wrote)."""
    from servers import fresh_database

    return fresh_database(pg_url, "prefect")


@pytest.fixture(scope="session")
def prefect_pg_server(prefect_pg_db, tmp_path_factory):
    """`prefect server start` on PostgreSQL with its own PREFECT_HOME; yields the API URL."""
    from servers import prefect_server

    with prefect_server(prefect_pg_db, tmp_path_factory.mktemp("prefect-pg-server")) as api:
        yield api


def run_result(output: str) -> dict:
    """The result of `vaeflow run --json`: its one JSON line (the last line starting with '{'; Prefect's own log
    lines may come after it when stderr is merged in)."""
    lines = [line for line in output.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result line in the output:\n{output[-3000:]}"
    return json.loads(lines[-1])


def run_stages(output: str) -> dict[str, str]:
    """{stage: status} from the human summary of `vaeflow run` (its `stages: a ran, b cached` line)."""
    line = next((line for line in output.splitlines() if line.startswith("stages: ")), None)
    assert line is not None, f"no stages line in the output:\n{output[-3000:]}"
    return dict(item.rsplit(" ", 1) for item in line.removeprefix("stages: ").split(", "))
