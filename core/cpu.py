"""CPU threads on a shared machine: how many a job may use, and how its idle threads wait.

Two jobs on the same cores, each with as many OpenMP threads as there are cores, run about ten times slower in
total than one alone (issue #14): libgomp's threads spin while they wait for each other (300,000 spins by default),
and the spinning threads of one job take the cores the other job's threads wait for. vaeflow does two things:

- each CPU job (a training, a pipeline stage, `vaeflow evaluate`) takes, once at its start, its share of the CPUs it
  may use (affinity, cgroup quota) divided by the number of CPU jobs that run then (jobs that start within
  SETTLE_SECONDS of each other count each other): those of this process (evaluate beside render) and those of other
  vaeflow processes of this user, each of which holds a slot file under the cache folder, locked by an flock that
  the kernel drops when the process dies (kill -9 included);
- `import vaeflow` bounds libgomp's spinning (GOMP_SPINCOUNT=SPIN_COUNT, set before torch loads libgomp, which reads
  it once): an idle thread spins briefly (tens of microseconds at most) and then sleeps, so a job whose threads
  outnumber the free cores (it started alone and another started later, or a `pip install` runs beside it) does not
  take the cores its own and the other job's threads wait for. Measured on 2 cores (bench/contention.json): one job
  alone runs at 1.00x libgomp's default (within noise); a 2-thread job beside a later 1-thread one keeps the pair's
  total at 1.02x one job alone instead of 0.71x. OMP_WAIT_POLICY=PASSIVE (no spin at all) cost 0.90x alone (0.41x on
  a busier host), as every parallel region then wakes sleeping threads.

The count is fixed for the whole job, never changed while it runs: OpenMP reductions round differently with another
thread count (a VQ-VAE-2 trains to other weights on 1 and 2 threads), so a count that followed the load would make
the same seed give other numbers. A training records its count in its checkpoint, and a resume keeps it, so a
resumed run matches an uninterrupted one on any load (on fewer usable CPUs than its count, it takes its share and
warns). `train.num_threads` (or an exported OMP_NUM_THREADS) fixes the
count for reruns that must match a run made under another load; an exported OMP_WAIT_POLICY or GOMP_SPINCOUNT is
left to libgomp as it is.
Imports no torch.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

STALE_TMP_SECONDS = 60.0  # a slot file still being made after this long belongs to a dead process
SLOT_SUFFIX = ".slot"
SETTLE_SECONDS = 0.1  # a job counts the others this long after taking its slot: jobs started together see each other
SPIN_COUNT = 1000  # libgomp busy-wait spins before an idle thread sleeps (its default: 300,000; throttled: 100)
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # the user's own choice of waiting, left as it is
log = logging.getLogger("vaeflow.cpu")
waiting = "not set"  # what set_waiting_policy found or did, for the log


def set_waiting_policy(environ=os.environ, modules=sys.modules) -> str:
    """Bound libgomp's spinning (GOMP_SPINCOUNT=SPIN_COUNT) unless the user chose a waiting policy or torch (and so
    libgomp, which reads it once) is already loaded; say which."""
    global waiting
    chosen = [f"{k}={environ[k]}" for k in WAIT_SETTINGS if environ.get(k)]
    if chosen == [f"GOMP_SPINCOUNT={SPIN_COUNT}"]:  # set by the vaeflow process that started this one
        waiting = f"GOMP_SPINCOUNT={SPIN_COUNT} (vaeflow's default)"
    elif chosen:
        waiting = f"{', '.join(chosen)} (exported)"
    elif "torch" in modules:
        waiting = "libgomp's default spinning (torch was imported before vaeflow)"
    else:
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        waiting = f"GOMP_SPINCOUNT={SPIN_COUNT} (vaeflow's default)"
    return waiting


def exported_waiting(environ=os.environ) -> dict[str, str]:
    """The waiting settings the user exported (an OMP_WAIT_POLICY, a GOMP_SPINCOUNT other than vaeflow's own)."""
    return {k: environ[k] for k in WAIT_SETTINGS
            if environ.get(k) and not (k == "GOMP_SPINCOUNT" and environ[k] == str(SPIN_COUNT))}


def waiting_policy() -> str:
    """What set_waiting_policy found or did (e.g. "GOMP_SPINCOUNT=1000 (vaeflow's default)")."""
    return waiting


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
    """One CPU job's slot and thread count: entering holds the slot and sets torch's threads to the job's share, once."""

    _count = 0
    _count_lock = threading.Lock()

    def __init__(self, name: str, num_threads: int | None = None, folder: Path | None = None, jobs_at_least: int = 1,
                 report: Callable[[int, str], None] | None = None):
        """`name` labels the slot (e.g. the stage id); `num_threads` (train.num_threads), else an exported
        OMP_NUM_THREADS (e.g. set by a launcher for its ranks), fixes the count; `jobs_at_least`: the jobs this one
        is planned to run beside, itself included, counted even when they do not run (a pipeline stage's cached
        siblings), so that its count does not depend on what was cached; `report(level, message)` also gets each
        line logged on `vaeflow.cpu` (a pipeline stage's Prefect log)."""
        self.name, self.folder, self.report = name, jobs_dir() if folder is None else folder, report
        self.jobs_at_least = max(1, jobs_at_least)
        self.fixed, self.fixed_by = num_threads, "train.num_threads"
        if not num_threads and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            self.fixed, self.fixed_by = int(os.environ["OMP_NUM_THREADS"]) or None, "OMP_NUM_THREADS"
        self.cpus = usable_cpus()
        self.jobs, self.threads = 1, num_threads or self.cpus
        self.fd: int | None = None
        self.path: Path | None = None
        self.previous: int | None = None  # torch's count before this job set it, restored on exit

    def __enter__(self) -> "CpuShare":
        import torch

        self.previous = torch.get_num_threads()
        self._take_slot()
        if self.fd is not None and not self.fixed:
            time.sleep(SETTLE_SECONDS)  # evaluate and render of one stage graph, or two runs started by one script
        self._choose()
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
        except OSError as exc:  # a read-only home: share as if alone, say so once
            log.warning("cannot record this job under %s (%s); its thread count ignores other jobs", self.folder, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps({"pid": os.getpid(), "job": self.name, "started": time.time()}).encode())
            self.path = self.folder / f"{stem}{SLOT_SUFFIX}"
            os.replace(tmp, self.path)
            self.fd = fd
        except OSError as exc:  # a full disk: no slot, and neither the descriptor nor the temp file is kept
            os.close(fd)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # left to the next count, which clears it after STALE_TMP_SECONDS
            self.path = None
            log.warning("cannot record this job under %s (%s); its thread count ignores other jobs", self.folder, exc)

    def _choose(self) -> None:
        """Count the running jobs, set torch's threads to this job's share (or the fixed count) and log why."""
        import torch

        if self.fixed:
            threads, reason = self.fixed, self.fixed_by
        else:
            self.jobs = max(self.jobs_at_least, running_jobs(self.folder) if self.fd is not None else 1)
            threads = fair_threads(self.cpus, self.jobs)
            reason = f"{self.cpus} usable CPUs shared by {self.jobs} CPU job(s)"
        torch.set_num_threads(threads)
        self.threads = threads
        self._say(logging.INFO, f"{self.name}: {threads} CPU thread(s) for the whole job ({reason}; "
                                f"OpenMP waiting: {waiting})")

    def _say(self, level: int, message: str) -> None:
        """Log `message` on vaeflow.cpu and pass it to `report`."""
        log.log(level, "%s", message)
        if self.report is not None:
            self.report(level, message)

    def fix(self, threads: int, why: str) -> None:
        """Set this job's count to `threads`, named by `why`."""
        self.fixed, self.fixed_by = threads, why
        self._choose()

    def resume(self, threads: int | None) -> None:
        """Keep the count a resumed training's checkpoint was trained with (`threads`), so that it rounds as the
        uninterrupted run would; not over train.num_threads or OMP_NUM_THREADS, and not above the usable CPUs."""
        if not threads or self.fixed or threads == self.threads:
            return
        if threads > self.cpus:  # a run moved to a smaller machine: as many threads as there are CPUs would thrash
            self._say(logging.WARNING, f"{self.name}: the checkpoint was trained with {threads} CPU threads, but "
                                       f"only {self.cpus} CPU(s) are usable here; it goes on with {self.threads}, so "
                                       f"its float rounding differs from an uninterrupted run's (set "
                                       f"train.num_threads to choose)")
            return
        self.fix(threads, "the count this run started with, kept on resume")


_active = threading.local()  # the CpuShare this thread runs under, if any


@contextmanager
def cpu_share(name: str, num_threads: int | None = None, jobs_at_least: int = 1,
              report: Callable[[int, str], None] | None = None):
    """Hold a CPU slot named `name` while the block runs, with torch's threads set to this job's share (or
    `num_threads`; `jobs_at_least` and `report`: see CpuShare); inside another share of the same thread (the train
    stage around the engine) the outer one is used."""
    outer = getattr(_active, "share", None)
    if outer is not None:
        yield outer
        return
    with CpuShare(name, num_threads, jobs_at_least=jobs_at_least, report=report) as share:
        _active.share = share
        try:
            yield share
        finally:
            _active.share = None
