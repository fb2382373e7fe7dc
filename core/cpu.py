"""CPU threads on a shared machine: how many a job may use, and OpenMP waiting that yields the core.

Two jobs on the same cores, each with as many OpenMP threads as there are cores, run about ten times slower in
total than one alone (issue #14): libgomp's threads spin while they wait for each other, and spinning threads of one
job steal the cores the other job's threads wait for. Two things avoid it:

- the waiting policy: OMP_WAIT_POLICY=PASSIVE makes a waiting thread sleep instead of spin. libgomp reads it once,
  when torch loads it, so `quiet_openmp` runs when `vaeflow` is imported, before torch is;
- the thread count: each job takes its share of the CPUs it may use (affinity, cgroup quota), divided by the number
  of CPU jobs that run at once: those of this process (evaluate beside render) and those of other vaeflow processes
  of this user (a slot file each, under the cache folder, held by an flock that the kernel drops when the process
  dies, kill -9 included). A job re-reads the count while it runs, so the first of two jobs gives up its extra
  threads when the second starts, and takes them back when it ends.

`train.num_threads` overrides the count; the policy is a default that an exported OMP_WAIT_POLICY (or GOMP_SPINCOUNT)
overrides.
Imports no torch at module level: `quiet_openmp` must run before torch loads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

WAIT_POLICY = "PASSIVE"  # threads that wait sleep: on a shared machine spinning threads starve the other jobs
REFRESH_SECONDS = 1.0  # how often a running job re-counts the jobs that share the CPUs
STALE_TMP_SECONDS = 60.0  # a slot file still being made after this long belongs to a dead process
SLOT_SUFFIX = ".slot"
log = logging.getLogger("vaeflow.cpu")


def quiet_openmp(environ: dict | None = None) -> bool:
    """Set OMP_WAIT_POLICY to PASSIVE unless the user set it or GOMP_SPINCOUNT, or OpenMP is already loaded; True if
    it was set."""
    import sys

    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ or "torch" in sys.modules:
        return False
    environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 cpu.max, else v1 cfs quota), or None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by its cgroup's quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def fair_threads(cpus: int, jobs: int) -> int:
    """Each of `jobs` CPU jobs' share of `cpus` (at least 1)."""
    return max(1, cpus // max(1, jobs))


def jobs_dir() -> Path:
    """The folder of the slot files of running CPU jobs: $VAEFLOW_CACHE_DIR/jobs, else the user cache's vaeflow/jobs."""
    if os.environ.get("VAEFLOW_CACHE_DIR"):
        return Path(os.environ["VAEFLOW_CACHE_DIR"]).expanduser() / "jobs"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vaeflow" / "jobs"


def _held_by_someone(path: Path) -> bool:
    """Whether a live process holds the slot file's lock; a stale one (its process died) is removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # removed meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    except OSError:
        os.close(fd)
        return False
    try:  # its process died, and the kernel dropped its lock
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def running_jobs(folder: Path | None = None) -> int:
    """The number of CPU jobs of this user that hold a slot now (this process's included); stale slots are removed."""
    folder = jobs_dir() if folder is None else folder
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    live = 0
    for entry in entries:
        if entry.name.endswith(SLOT_SUFFIX):
            live += _held_by_someone(Path(entry.path))
        elif entry.name.endswith(".tmp"):  # a slot being made; one left by a dead process is cleared after a while
            try:
                if time.time() - entry.stat().st_mtime > STALE_TMP_SECONDS:
                    _held_by_someone(Path(entry.path))
            except OSError:
                pass
    return live


class CpuShare:
    """One CPU job's slot and thread count: enter to hold the slot, `refresh()` while running to follow the others."""

    _count = 0
    _count_lock = threading.Lock()

    def __init__(self, name: str, num_threads: int | None = None, folder: Path | None = None):
        """`name` labels the slot (e.g. the stage id); `num_threads` fixes the count (train.num_threads)."""
        self.name, self.fixed, self.folder = name, num_threads, jobs_dir() if folder is None else folder
        self.cpus = usable_cpus()
        self.jobs, self.threads = 1, num_threads or self.cpus
        self.fd: int | None = None
        self.path: Path | None = None
        self.checked = 0.0
        self.previous: int | None = None  # torch's count before this job set it, restored on exit

    def __enter__(self) -> "CpuShare":
        import torch

        self.previous = torch.get_num_threads()
        self._take_slot()
        self.refresh(force=True)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.previous is not None:
            torch.set_num_threads(self.previous)

    def _take_slot(self) -> None:
        """Make this job's slot file: locked under a temporary name, then renamed, so no reader sees it unlocked."""
        with CpuShare._count_lock:
            CpuShare._count += 1
            n = CpuShare._count
        stem = f"{os.getpid()}-{threading.get_ident()}-{n}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{stem}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"pid": os.getpid(), "job": self.name, "started": time.time()}).encode())
            self.path = self.folder / f"{stem}{SLOT_SUFFIX}"
            os.replace(tmp, self.path)
            self.fd = fd
        except OSError as exc:  # a read-only home: share as if alone, say so once
            log.warning("cannot record this job under %s (%s); its thread count ignores other jobs", self.folder, exc)

    def refresh(self, force: bool = False) -> bool:
        """Re-count the running jobs (at most every REFRESH_SECONDS) and set torch's threads; True if they changed."""
        import torch

        now = time.monotonic()
        if not force and now - self.checked < REFRESH_SECONDS:
            return False
        self.checked = now
        if self.fixed:
            threads, reason = self.fixed, "train.num_threads"
        else:
            self.jobs = max(1, running_jobs(self.folder)) if self.fd is not None else 1
            threads = fair_threads(self.cpus, self.jobs)
            reason = f"{self.cpus} usable CPUs shared by {self.jobs} CPU job(s)"
        changed = threads != torch.get_num_threads()
        if changed:
            torch.set_num_threads(threads)
        if changed or force:
            log.info("%s: %d thread(s) (%s, OMP_WAIT_POLICY=%s)", self.name, threads, reason,
                     os.environ.get("OMP_WAIT_POLICY", "unset"))
        self.threads = threads
        return changed


_active = threading.local()  # the CpuShare this thread runs under, if any


@contextmanager
def cpu_share(name: str, num_threads: int | None = None):
    """Hold a CPU slot named `name` while the block runs, with torch's threads set to this job's share; inside
    another share of the same thread (the train stage around the engine) the outer one is used."""
    outer = getattr(_active, "share", None)
    if outer is not None:
        yield outer
        return
    with CpuShare(name, num_threads) as share:
        _active.share = share
        try:
            yield share
        finally:
            _active.share = None
