"""CPU threads on a shared machine: how many a job may use, re-counted while it runs.

Two jobs on the same cores, each with as many OpenMP threads as there are cores, run about ten times slower in
total than one alone (issue #14): libgomp's threads spin while they wait for each other, and the spinning threads of
one job take the cores the other job's threads wait for. vaeflow avoids the oversubscription rather than the spin:

- each CPU job (a training, a pipeline stage, `vaeflow evaluate`) takes its share of the CPUs it may use (affinity,
  cgroup quota) divided by the number of CPU jobs that run at once: those of this process (evaluate beside render)
  and those of other vaeflow processes of this user, each of which holds a slot file under the cache folder, locked
  by an flock that the kernel drops when the process dies (kill -9 included);
- where the CPUs are this process's affinity set (no cgroup quota), the time other processes spent on them since
  the last count (/proc/stat less this process's own time) is left to them: a job beside a `pip install` that keeps
  a core busy takes one thread fewer;
- a job re-counts every REFRESH_SECONDS while it runs, so the first of two jobs gives up its extra threads when the
  second starts, and takes them back when it ends.

libgomp's waiting policy is left as it is: a non-spinning one (OMP_WAIT_POLICY=PASSIVE) measured 0.41x the images/s
of the default for one job alone on 2 cores (`passive_vs_default_alone` in bench/contention.json), because its
threads sleep and wake at every parallel region; once no job has more threads than its share, spinning costs nothing.
`train.num_threads` (or an exported OMP_NUM_THREADS) fixes the count; an exported OMP_WAIT_POLICY is passed on to
libgomp as usual.
Imports no torch at module level.
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

REFRESH_SECONDS = 1.0  # how often a running job re-counts the jobs that share the CPUs
STALE_TMP_SECONDS = 60.0  # a slot file still being made after this long belongs to a dead process
SLOT_SUFFIX = ".slot"
BUSY_ELSEWHERE = 0.5  # CPUs: other processes' use of this job's CPUs from which it leaves them one (rounded)
STAT_COLUMNS_BUSY = (0, 1, 2, 5, 6, 7)  # /proc/stat cpuN columns: user nice system (idle iowait) irq softirq steal
log = logging.getLogger("vaeflow.cpu")


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


def cpu_busy_seconds(cpus: set[int], stat: Path = Path("/proc/stat")) -> float | None:
    """Seconds the CPUs `cpus` have been busy since boot, all processes together (/proc/stat); None if unreadable."""
    try:
        lines = stat.read_text().splitlines()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    busy = 0
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            busy += sum(int(values[i]) for i in STAT_COLUMNS_BUSY if i < len(values))
    return busy / ticks


def left_to_others(cpus: int, others: float) -> int:
    """The CPUs of `cpus` a job may take when other processes keep `others` CPUs busy on them (at least 1)."""
    return max(1, min(cpus, math.floor(cpus - others + BUSY_ELSEWHERE)))


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
        """`name` labels the slot (e.g. the stage id); `num_threads` (train.num_threads), else an exported
        OMP_NUM_THREADS (e.g. set by a launcher for its ranks), fixes the count."""
        self.name, self.folder = name, jobs_dir() if folder is None else folder
        self.fixed, self.fixed_by = num_threads, "train.num_threads"
        if not num_threads and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            self.fixed, self.fixed_by = int(os.environ["OMP_NUM_THREADS"]) or None, "OMP_NUM_THREADS"
        self.cpus = usable_cpus()
        self.jobs, self.threads, self.others = 1, num_threads or self.cpus, 0.0
        try:  # other processes' use is measured where the CPUs are the affinity set, not a cgroup quota's share
            self.affinity = set(os.sched_getaffinity(0)) if cgroup_cpus() is None else None
        except (AttributeError, OSError):
            self.affinity = None
        self.sample: tuple[float, float, float] | None = None  # (wall, busy CPU seconds, this process's seconds)
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

    def _others(self) -> float:
        """CPUs that other processes kept busy on this job's CPUs since the last count (0 before two counts)."""
        if self.affinity is None:
            return 0.0
        busy, now, own = cpu_busy_seconds(self.affinity), time.monotonic(), time.process_time()
        previous = self.sample
        if busy is None:
            self.sample = None
            return self.others
        if previous is not None and now - previous[0] < 0.5 * REFRESH_SECONDS:
            return self.others  # too soon to tell: keep the older sample, so the interval keeps growing
        self.sample = (now, busy, own)
        if previous is None:
            return self.others
        return max(0.0, ((busy - previous[1]) - (own - previous[2])) / (now - previous[0]))

    def refresh(self, force: bool = False) -> bool:
        """Re-count the running jobs and the CPUs others use (at most every REFRESH_SECONDS) and set torch's
        threads; True if they changed."""
        now = time.monotonic()
        if not force and now - self.checked < REFRESH_SECONDS:
            return False
        import torch

        self.checked = now
        if self.fixed:
            threads, reason = self.fixed, self.fixed_by
        else:
            self.jobs = max(1, running_jobs(self.folder)) if self.fd is not None else 1
            self.others = self._others()
            threads = min(fair_threads(self.cpus, self.jobs), left_to_others(self.cpus, self.others))
            reason = (f"{self.cpus} usable CPUs shared by {self.jobs} CPU job(s), {self.others:.1f} kept busy by "
                      f"other processes")
        changed = threads != torch.get_num_threads()
        if changed:
            torch.set_num_threads(threads)
        if changed or force:
            log.info("%s: %d thread(s) (%s)", self.name, threads, reason)
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
