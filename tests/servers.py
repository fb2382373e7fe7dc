"""Real PostgreSQL, MLflow and Prefect servers as local processes, for tests of the team setup (no Docker, no mocks)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from test_serve import free_port, healthy, wait_for

ROOT = Path(__file__).resolve().parents[1]
PG_CLUSTER = ROOT / "scripts" / "pg-cluster"
BIN = Path(sys.executable).parent
PG_URL_ENV = "VAEFLOW_TEST_PG_URL"
START_TIMEOUT = 180  # seconds; the machines are slow and shared
QUIET = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class MlflowServer:
    """A running `mlflow server`: its URL, its proxied artifact folder and its backend database URL."""

    uri: str
    artifacts: Path
    db: str


@contextlib.contextmanager
def postgres(url: str | None = None) -> Iterator[str]:
    """Yield a PostgreSQL base URL: `url`, else $VAEFLOW_TEST_PG_URL, else a throwaway cluster started here."""
    url = url or os.environ.get(PG_URL_ENV)
    if url:
        yield url.rstrip("/")
        return
    # not under pytest's tmp_path: its parent folders are private to root, and the server runs as `postgres`
    _teardown_on_sigterm()
    folder = tempfile.mkdtemp(prefix="vaeflow-pg-")
    try:
        started = subprocess.run([str(PG_CLUSTER), "start", folder], capture_output=True, text=True)
        assert started.returncode == 0, f"scripts/pg-cluster start failed ({started.returncode}):\n{started.stderr}"
        try:
            yield started.stdout.strip().splitlines()[-1]
        finally:
            subprocess.run([str(PG_CLUSTER), "stop", folder], check=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fresh_database(base_url: str, prefix: str) -> str:
    """Create an empty database with a unique name starting with `prefix` and return its URL."""
    import psycopg2

    name = f"{re.sub(r'[^a-z0-9_]', '_', prefix.lower())}_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(f"{base_url}/postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return f"{base_url}/{name}"


def _raise_interrupt(signum, frame):
    """Signal handler: raise KeyboardInterrupt, which pytest answers by tearing its fixtures down."""
    raise KeyboardInterrupt(f"signal {signum}")


def _teardown_on_sigterm() -> None:
    """Make SIGTERM (`timeout`, a cancelled CI job) a KeyboardInterrupt, so pytest still stops the servers."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


def _tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file, for assertion messages."""
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"(no log at {path})"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM a server's whole process group; SIGKILL whatever is left after 30 s (workers included)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def _serve(args: list[str], env: dict, cwd: Path, log_path: Path, health_url: str, what: str) -> Iterator[None]:
    """Run a server in its own process group with its output in `log_path`; wait for `health_url`; stop it at exit."""
    _teardown_on_sigterm()
    env = {k: v for k, v in {**os.environ, **QUIET, **env}.items() if v is not None}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_for(lambda: healthy(health_url) or proc.poll() is not None, START_TIMEOUT, what)
            except AssertionError as e:
                raise AssertionError(f"{e}; its log {log_path} ends with:\n{_tail(log_path)}") from None
            assert proc.poll() is None, f"{what} exited with {proc.returncode}; its log {log_path}:\n{_tail(log_path)}"
            yield
        finally:
            _stop(proc)


@contextlib.contextmanager
def mlflow_server(db_url: str, artifacts_dir: Path, workers: int = 1) -> Iterator[str]:
    """Yield the URL of `mlflow server` on `db_url`, proxying artifacts into `artifacts_dir`; log beside that folder."""
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", with_driver(db_url, "psycopg2"),
            "--artifacts-destination", str(artifacts_dir), "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]
    # MLflow 3.17 also starts a job runner with 7 huey consumer processes (GenAI jobs) on database stores:
    # tracking, registry and artifacts do not use it, and on 2 cores it doubles the start-up
    env = {"MLFLOW_TRACKING_URI": None, "MLFLOW_REGISTRY_URI": None, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with _serve(args, env, artifacts_dir.parent, artifacts_dir.parent / "mlflow-server.log", url, "mlflow server"):
        yield url


@contextlib.contextmanager
def prefect_server(db_url: str, home: Path) -> Iterator[str]:
    """Yield the API URL of `prefect server start` on PostgreSQL `db_url`, with PREFECT_HOME `home` (log in there)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": None, "PREFECT_PROFILE": None,
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": with_driver(db_url, "asyncpg")}
    with _serve(args, env, home, home / "server.log", api, "prefect server"):
        yield api


def with_driver(db_url: str, driver: str) -> str:
    """`db_url` as an SQLAlchemy URL naming its driver: SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", f"postgresql+{driver}://", db_url)
