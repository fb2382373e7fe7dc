"""The workspace: the folder that holds a pipeline's stage outputs, its Prefect cache records and its locks.

A workspace belongs to one tracking store. Every stage's cache key carries the workspace's path and the
store's identity, and the records themselves live inside the workspace (not in the shared
PREFECT_HOME), so a cached result always comes from this folder and this store. Workers on other
machines share a workspace by pointing VAEFLOW_HOME (or `tracking.workspace`) at one shared path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vaeflow.core.config import Config

RESULTS_DIR = "prefect-results"  # Prefect's cache records and stage results, per workspace
LOCKS_DIR = "locks"


def workspace(cfg: Config) -> Path:
    """The absolute workspace folder: tracking.workspace, relative to VAEFLOW_HOME (else the current folder)."""
    from vaeflow.pipelines.tracking import project_root

    ws = Path(cfg.tracking.workspace)
    return (ws if ws.is_absolute() else project_root() / ws).resolve()


def store_identity() -> str:
    """The tracking store this process writes to (its URI)."""
    from vaeflow.pipelines.tracking import tracking_uri

    return tracking_uri().rstrip("/")


def scope(cfg: Config) -> str:
    """A short digest of (workspace, tracking store): part of every stage's cache key."""
    return hashlib.sha256(f"{workspace(cfg)}\n{store_identity()}".encode()).hexdigest()[:16]


def result_storage(cfg: Config) -> Path:
    """Where Prefect keeps this workspace's cache records and stage results."""
    return workspace(cfg) / RESULTS_DIR


@contextmanager
def stage_lock(cfg: Config, key: str, log: logging.Logger | logging.LoggerAdapter | None = None) -> Iterator[None]:
    """Hold an exclusive lock on one stage key in this workspace: a second run of the same stage waits here,
    then finds the first one's outputs. The kernel drops the lock when its holder dies, kill -9 included."""
    path = workspace(cfg) / LOCKS_DIR / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log.info("%s is being computed by another run in this workspace; waiting for it", key)
            start = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            if log is not None:
                log.info("waited %.0f s for %s; reusing what the other run wrote", time.monotonic() - start, key)
        yield
