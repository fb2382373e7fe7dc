"""MLflow tracking for pipeline runs.

MLflow's active run is thread-local and Prefect runs tasks in worker threads, so everything here
takes explicit run ids and goes through an MlflowClient. The embedded default is a sqlite store
(`mlflow.db`) plus an absolute artifact folder (`mlartifacts/`) under the project folder;
MLFLOW_TRACKING_URI points at a server instead.
"""

from __future__ import annotations

import fcntl
import os
import platform
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vaeflow import __version__
from vaeflow.core.config import Config, config_hash
from vaeflow.core.checkpoint import STORE_FILE, missing_store, plugins_used  # noqa: F401 (missing_store re-exported)
from vaeflow.core.errors import VaeflowError, masked_url

DB_FILE = STORE_FILE
ARTIFACTS_DIR = "mlartifacts"
MAX_BATCH = 900  # MLflow accepts at most 1000 metrics or 100 params per log_batch call


def project_root() -> Path:
    """The folder the embedded store lives in: VAEFLOW_HOME, else the current folder."""
    return Path(os.environ.get("VAEFLOW_HOME", Path.cwd())).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else sqlite:///<project>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / DB_FILE}"


def _create_sqlite_once(uri: str) -> None:
    """Create and migrate the sqlite store under a file lock: parallel first runs race on migrations."""
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)


def get_client(create: bool = True) -> MlflowClient:
    """A client for the configured store. The embedded sqlite one is created when missing, unless `create` is False
    (a lookup: a VaeflowError then says there is no store, and no file is made).

    A store that can not be used is a VaeflowError naming it and what would work (store_problem, probe_server): a URI
    MLflow has no store for, a folder store, a file that is not an SQLite database, a tracking server that does not
    answer (one short probe, probe_server, instead of MLflow's minutes of retries)."""
    uri = tracking_uri()
    if not create and (why := missing_store(uri)):
        raise VaeflowError(why)
    if uri.startswith(("http://", "https://")):
        probe_server(uri)
    else:
        probe_database(uri)
    try:
        if uri.startswith("sqlite:///"):
            _create_sqlite_once(uri)
        client = MlflowClient(uri, registry_uri=uri)
    except Exception as exc:
        why = store_problem(uri, exc)
        if why is None:
            raise
        raise VaeflowError(why) from None
    # for the few fluent calls (log_model) made inside a task's own thread; MLflow 3 also exports these as
    # environment variables, which would then pin every later call in this process to this store as if the
    # user had set MLFLOW_TRACKING_URI, so the user's own values are put back
    saved = {var: os.environ.get(var) for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    return client


# --- a store that can not be used: what was wrong, where, and what would work ---------------------
STORE_FORMS = ("sqlite:///PATH/mlflow.db (a local store), http(s)://HOST:PORT (an `mlflow server`), or a database "
               "URL such as postgresql://USER@HOST:PORT/DB")
PROBE_TIMEOUT = 5.0  # seconds: a tracking server answers /health at once; MLflow's own retries take minutes
_answered: set[str] = set()  # servers that answered in this process: probed once


def store_source(uri: str) -> str:
    """Where the store URI came from, as a message names it: `MLFLOW_TRACKING_URI=...`, or the embedded store."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return f"MLFLOW_TRACKING_URI={masked_url(uri)}"
    return f"the MLflow store {uri} (mlflow.db in VAEFLOW_HOME or the current folder)"


def _chain(exc: BaseException | None) -> list[BaseException]:
    """An exception and the ones it was raised from or during."""
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _chain_text(exc: BaseException) -> str:
    """The messages of an exception and of the ones it was raised from or during."""
    return "\n".join(str(e) for e in _chain(exc))


def store_problem(uri: str, exc: BaseException) -> str | None:
    """What is wrong with the store at `uri`, given what opening it raised; None when it is not the store's URI or
    file (a bug, or a passing failure: the caller re-raises it)."""
    from urllib.parse import urlsplit

    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    text = _chain_text(exc)
    where = store_source(uri)
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if isinstance(exc, UnsupportedModelRegistryStoreURIException) or "unsupported URI" in text:
        return f"{where} is not a store URI MLflow can use (scheme {scheme or 'none'!r}); use {STORE_FORMS}"
    if scheme in ("", "file") and "filesystem tracking backend" in text:
        return (f"{where} names a folder store (MLflow's filesystem backend, like ./mlruns), which MLflow 3 no "
                f"longer opens by default; use sqlite:///PATH/mlflow.db or a tracking server http(s)://HOST:PORT "
                f"(`mlflow migrate-filestore` converts an existing folder store), or set MLFLOW_ALLOW_FILE_STORE=true "
                f"to use the folder anyway")
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        via = " (MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") else ""
        if "file is not a database" in text or "file is encrypted" in text:
            return (f"{path}{via} is not an SQLite database (corrupt, or another kind of file), so the MLflow store "
                    f"in it can not be read: restore it from a backup, or move it aside and run `vaeflow run CONFIG` "
                    f"to start a new store; or point VAEFLOW_HOME or MLFLOW_TRACKING_URI at the right store")
        if "unable to open database file" in text:
            return (f"cannot open the MLflow store {path}{via}: check that the file and its folder are readable and "
                    f"writable, or point VAEFLOW_HOME or MLFLOW_TRACKING_URI at another store")
    missing = next((e for e in _chain(exc) if isinstance(e, ImportError)), None)
    if missing is not None and _database_scheme(uri):
        return (f"{where} needs the database driver module {missing.name or '?'!r}, which is not installed: install "
                f"it, or name an installed driver in the URL (e.g. postgresql+psycopg2://USER@HOST:PORT/DB)")
    return None


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # the database schemes MLflow accepts


def _database_scheme(uri: str) -> str | None:
    """The database of a database-server store URL (postgresql+psycopg2://... -> postgresql), else None."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    return scheme if scheme in DATABASE_PORTS else None


def probe_database(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """For a database-server store (postgresql://, mysql://, mssql://) with a host: raise a VaeflowError unless its
    port accepts a connection within `timeout` seconds (MLflow retries a refused connection for about 100 s). A
    socket path or no host: nothing to probe. Other URIs: nothing."""
    import socket
    from urllib.parse import urlsplit

    scheme = _database_scheme(uri)
    if scheme is None or uri in _answered:
        return
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or DATABASE_PORTS[scheme]
    except ValueError as exc:
        raise VaeflowError(f"MLFLOW_TRACKING_URI={masked_url(uri)} is not a valid database URL ({exc}); use "
                           f"{STORE_FORMS}") from None
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = ("its host name does not resolve" if isinstance(exc, socket.gaierror) else
                  f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else
                  "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc)[:200])
        raise VaeflowError(f"MLFLOW_TRACKING_URI={masked_url(uri)}: no {scheme} database server answers at "
                           f"{host}:{port} ({reason}); start it, fix the address, or unset MLFLOW_TRACKING_URI to use "
                           f"the local store (mlflow.db in VAEFLOW_HOME or the current folder)") from None
    _answered.add(uri)


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Raise a VaeflowError unless a server answers at the tracking server address `uri` within `timeout` seconds.

    MLflow retries a request that gets no answer with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, 7 by default, each
    up to MLFLOW_HTTP_REQUEST_TIMEOUT, 120 s), so a wrong address would hang a command for minutes. Any HTTP answer
    counts, whatever its status (a server behind a proxy or with authentication may refuse /health): what follows
    reports it. One GET of /health per server and process."""
    import requests

    base = uri.rstrip("/")
    if base in _answered:
        return
    try:
        requests.get(f"{base}/health", timeout=timeout, allow_redirects=False)
    except requests.exceptions.SSLError:
        pass  # something answered, in TLS: MLflow's own TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH, ...) decide
    except requests.exceptions.Timeout:
        raise VaeflowError(_no_server(uri, f"no answer within {timeout:g} s")) from None
    except requests.exceptions.ConnectionError as exc:
        text = str(exc)
        reason = ("connection refused" if "refused" in text.lower() else
                  "its host name does not resolve" if any(s in text for s in ("NameResolution", "not known",
                                                                               "nodename nor servname",
                                                                               "Temporary failure in name"))
                  else text.splitlines()[0][:200])
        raise VaeflowError(_no_server(uri, reason)) from None
    except requests.exceptions.RequestException as exc:  # a malformed address
        raise VaeflowError(f"MLFLOW_TRACKING_URI={masked_url(uri)} is not a usable server address "
                           f"({str(exc).splitlines()[0][:200]}); use {STORE_FORMS}") from None
    _answered.add(base)


def _no_server(uri: str, reason: str) -> str:
    return (f"MLFLOW_TRACKING_URI={masked_url(uri)}: no MLflow tracking server answers there ({reason}). Start one "
            f"(e.g. `mlflow server --backend-store-uri sqlite:///PATH/mlflow.db --host 127.0.0.1 --port 5000`), fix "
            f"the address, or unset MLFLOW_TRACKING_URI to use the local store (mlflow.db in VAEFLOW_HOME, else the "
            f"current folder)")


# MLflow 3's UI opens an experiment in its model-training view (not the GenAI one) with this tag
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with an absolute artifact location if missing, tagged as model training."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if tracking_uri().startswith("sqlite:///"):
            location = (project_root() / ARTIFACTS_DIR / name).as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it first
            exp_id = client.get_experiment_by_name(name).experiment_id
        return exp_id
    if exp.tags.get("mlflow.experimentKind") is None:  # created before vaeflow tagged experiments
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def ui_hint(uri: str | None = None) -> str:
    """How to open the MLflow UI on the store actually used."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open http://127.0.0.1:5000"


def ui_base(uri: str | None = None) -> str:
    """The MLflow UI's address: the tracking server, or `mlflow ui`'s default address for a local store."""
    uri = uri or tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(exp_id: str, run_id: str, uri: str | None = None) -> str:
    """The MLflow UI address of a run."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}"


def model_version_url(name: str, version: int | str, uri: str | None = None) -> str:
    """The MLflow UI address of a registered model version."""
    return f"{ui_base(uri)}/#/models/{name}/versions/{version}"


# --- crash hygiene: every run names the process that owns it ----------------------------------
HOST_TAG, PID_TAG, START_TAG = "vaeflow.host", "vaeflow.pid", "vaeflow.pid_start"


def _process_start(pid: int) -> str:
    """The start time of process pid in clock ticks since boot (field 22 of /proc/PID/stat), '' if unknown.

    Together with the pid it names one process: a pid reused by a later process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags naming this process: host, pid and the pid's start time."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), START_TAG: _process_start(os.getpid())}


def process_alive(pid: int, start: str) -> bool:
    """Whether the process that set these tags on this host still runs (a zombie does not: it died unreaped)."""
    from vaeflow.pipelines.processes import alive

    return alive(pid) and (not start or _process_start(pid) in ("", start))


def reap_dead_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment whose owning process on this host has died; their ids.

    A run killed by any signal (kill -9 included) can not end itself; the next pipeline run ends it."""
    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    reaped = []
    for run in client.search_runs([exp_id], query, max_results=1000):
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if pid == os.getpid() or process_alive(pid, tags.get(START_TAG, "")):
            continue
        set_tags(client, run.info.run_id, {"error": f"process {pid} on {host} died before the run ended"})
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    return reaped


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}; lists become their JSON-ish repr."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit() -> str:
    """The current git commit of the working folder, or 'unknown'."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=project_root()).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: Config, device: str) -> dict[str, str]:
    """Tags on every run: git commit, versions, plugins, device, config hash."""
    import torch

    tags = {
        "git_commit": git_commit(), "vaeflow_version": __version__, "torch_version": torch.__version__,
        "python_version": platform.python_version(), "device": device, "config_hash": config_hash(cfg),
    }
    for field, info in plugins_used(cfg).items():
        tags[f"plugin.{field}"] = f"{info['name']} ({info['source']})"
    return tags


def start_run(client: MlflowClient, exp_id: str, name: str, parent_id: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Create a run (nested under parent_id if given) and return its id."""
    tags = {**(tags or {}), **process_tags()}
    tags["mlflow.runName"] = name
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client.create_run(exp_id, tags=tags, run_name=name).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log many params in batches of 100."""
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric metrics at one step."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")]
    for i in range(0, len(items), MAX_BATCH):
        client.log_batch(run_id, metrics=items[i : i + MAX_BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Set many tags in one call."""
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


@contextmanager
def stage_run(client: MlflowClient, exp_id: str, parent_id: str, stage: str, tags: dict[str, str]) -> Iterator[str]:
    """A nested run for one stage: FINISHED when the block succeeds, KILLED when interrupted (Ctrl-C, SIGTERM),
    FAILED with the error otherwise."""
    run_id = start_run(client, exp_id, stage, parent_id, {**tags, "stage": stage})
    try:
        yield run_id
    except BaseException as exc:
        end_failed(client, run_id, exc)
        raise
    log_metrics(client, run_id, {"peak_rss_gib": peak_rss_gib()})
    client.set_terminated(run_id, "FINISHED")


def end_failed(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """End a run that raised: KILLED for an interruption, FAILED with the error for anything else."""
    from prefect.exceptions import ExternalSignal  # Prefect's own SIGTERM handler in flow runs raises TerminationSignal

    interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit, ExternalSignal))
    set_tags(client, run_id, {"error": "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"})
    client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Engine callback: step metrics (train/*) at every sync, epoch metrics (epoch/*) at every epoch."""

    def __init__(self, client: MlflowClient, run_id: str, constant: set[str] = frozenset()):
        """`constant`: record keys that never change in this run (a fixed lr or beta): params, so not logged."""
        self.client, self.run_id, self.skip = client, run_id, {"epoch", *constant}

    def on_log(self, step: int, record: dict[str, Any]) -> None:
        """Loss terms, beta, lr and img/s every log_every steps."""
        log_metrics(self.client, self.run_id, {f"train/{k}": v for k, v in record.items() if k not in self.skip}, step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's mean terms, at step = epoch."""
        log_metrics(self.client, self.run_id, {f"epoch/{k}": v for k, v in record.items() if k not in self.skip},
                    record["epoch"])
