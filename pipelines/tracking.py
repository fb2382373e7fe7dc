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
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core import __version__
from core.config import Config, config_hash
from core.checkpoint import plugins_used

DB_FILE = "mlflow.db"
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


def get_client() -> MlflowClient:
    """A client for the configured store, which is created if it is the embedded sqlite one."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _create_sqlite_once(uri)
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
    return MlflowClient(uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with an absolute artifact location if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        location = (project_root() / ARTIFACTS_DIR / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


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
    tags = dict(tags or {})
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
    """A nested run for one stage: FINISHED when the block succeeds, FAILED with the error otherwise."""
    run_id = start_run(client, exp_id, stage, parent_id, {**tags, "stage": stage})
    try:
        yield run_id
    except BaseException as exc:
        set_tags(client, run_id, {"error": f"{type(exc).__name__}: {exc}"})
        client.set_terminated(run_id, "FAILED")
        raise
    log_metrics(client, run_id, {"peak_rss_gib": peak_rss_gib()})
    client.set_terminated(run_id, "FINISHED")


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    """Engine callback: step metrics (train/*) at every sync, epoch metrics (epoch/*) at every epoch."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def on_log(self, step: int, record: dict[str, Any]) -> None:
        """Loss terms, beta, lr and img/s every log_every steps."""
        log_metrics(self.client, self.run_id, {f"train/{k}": v for k, v in record.items()}, step)

    def on_epoch(self, record: dict[str, Any]) -> None:
        """The epoch's mean terms, at step = epoch."""
        log_metrics(self.client, self.run_id, {f"epoch/{k}": v for k, v in record.items() if k != "epoch"},
                    record["epoch"])
