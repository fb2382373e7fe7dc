"""core.cpu: each CPU job's share of the usable CPUs, counted from slot files that die with their process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaeflow.core import cpu
from vaeflow.core.config import validate

HOLDER = """
import sys
from pathlib import Path
from vaeflow.core.cpu import CpuShare
with CpuShare("holder", folder=Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """Start another process that holds a slot in tmp_path/jobs; yields (its Popen, the folder)."""
    folder = tmp_path / "jobs"
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "holding"
        procs.append(p)
        return p

    yield start, folder
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_fair_threads_by_hand():
    assert [cpu.fair_threads(16, n) for n in (1, 2, 3, 4, 16, 40)] == [16, 8, 5, 4, 1, 1]
    assert cpu.fair_threads(2, 0) == 2 and cpu.fair_threads(1, 3) == 1


def test_cgroup_quota(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_cpus(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpus(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpus(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpus(v1) is None
    assert cpu.cgroup_cpus(tmp_path / "none") is None


def test_usable_cpus_within_affinity_and_quota(monkeypatch):
    assert 1 <= cpu.usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu, "cgroup_cpus", lambda: 0.5)  # half a CPU still runs one thread
    assert cpu.usable_cpus() == 1


def test_slots_count_this_and_other_processes(tmp_path, holder, monkeypatch):
    start, folder = holder
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "cpu_busy_seconds", lambda cpus: None)  # jobs only: the holder's start-up is not load
    assert cpu.running_jobs(folder) == 0
    with cpu.CpuShare("here", folder=folder) as share:
        assert cpu.running_jobs(folder) == 1 and share.jobs == 1
        other = start()
        share.cpus = 4  # whatever this machine has: 4 CPUs shared by 2 jobs is 2 each
        share.refresh(force=True)
        assert share.jobs == 2 and share.threads == 2 == torch.get_num_threads()
        other.stdin.write("done\n")
        other.stdin.flush()
        other.wait()
        share.refresh(force=True)
        assert share.jobs == 1 and share.threads == 4 == torch.get_num_threads()
    assert cpu.running_jobs(folder) == 0
    assert not list(folder.iterdir())  # both slots were removed by their owners


def test_kill_9_leaves_a_slot_the_next_count_clears(holder):
    start, folder = holder
    p = start()
    assert cpu.running_jobs(folder) == 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert len(list(folder.glob(f"*{cpu.SLOT_SUFFIX}"))) == 1  # the dead process could not remove it
    assert cpu.running_jobs(folder) == 0  # the kernel dropped its lock: stale, and removed
    assert not list(folder.glob(f"*{cpu.SLOT_SUFFIX}"))


def test_jobs_of_one_process_in_threads_count_apart(tmp_path):
    folder = tmp_path / "jobs"
    seen, ready, release = [], threading.Barrier(2), threading.Event()

    def job():
        with cpu.CpuShare("stage", folder=folder):
            ready.wait()
            seen.append(cpu.running_jobs(folder))
            release.wait()

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 2:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert seen == [2, 2]


def test_nested_share_is_the_outer_one(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(tmp_path))
    with cpu.cpu_share("stage") as outer:
        with cpu.cpu_share("train") as inner:
            assert inner is outer
            assert cpu.running_jobs(cpu.jobs_dir()) == 1
    assert cpu.running_jobs(cpu.jobs_dir()) == 0


def test_num_threads_fixes_the_count(holder):
    start, folder = holder
    start()
    before = torch.get_num_threads()
    with cpu.CpuShare("fixed", num_threads=3, folder=folder) as share:
        assert share.threads == 3 == torch.get_num_threads()
    assert torch.get_num_threads() == before  # restored on exit


def test_an_exported_omp_num_threads_fixes_the_count(holder, monkeypatch):
    """A launcher (torchrun ranks, a user's shell) that exports OMP_NUM_THREADS has chosen: the count is kept."""
    start, folder = holder
    start()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with cpu.CpuShare("rank", folder=folder) as share:
        assert (share.threads, share.fixed_by) == (3, "OMP_NUM_THREADS") and torch.get_num_threads() == 3
    with cpu.CpuShare("rank", num_threads=1, folder=folder) as share:  # train.num_threads wins
        assert share.threads == 1


def test_an_unwritable_folder_runs_alone(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with cpu.CpuShare("x", folder=blocker / "jobs") as share:
        assert share.jobs == 1 and share.threads == share.cpus


def test_cpu_busy_seconds_by_hand(tmp_path):
    """user + nice + system + irq + softirq + steal of the CPUs asked for, idle and iowait left out, in seconds."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 900 9000 90 0 0 0 0 0\n"
                    "cpu0 100 10 50 4000 40 5 5 2 0 0\n"
                    "cpu1 200 20 60 3000 30 1 1 1 0 0\n"
                    "cpu2 999 999 999 1 1 1 1 1 0 0\n"
                    "intr 12345\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert cpu.cpu_busy_seconds({0, 1}, stat) == pytest.approx((100 + 10 + 50 + 5 + 5 + 2 + 200 + 20 + 60 + 1 + 1 + 1)
                                                               / ticks)
    assert cpu.cpu_busy_seconds({2}, stat) == pytest.approx((999 * 3 + 3) / ticks)
    assert cpu.cpu_busy_seconds({0}, tmp_path / "none") is None


def test_left_to_others_by_hand():
    """Another process's use of half a CPU or more costs this job a thread; less costs nothing."""
    assert [cpu.left_to_others(2, o) for o in (0.0, 0.4, 0.6, 1.0, 1.6, 5.0)] == [2, 2, 1, 1, 1, 1]
    assert [cpu.left_to_others(16, o) for o in (0.0, 1.0, 3.2, 15.9)] == [16, 15, 13, 1]


BUSY = "import sys\nprint('busy', flush=True)\nwhile True:\n    pass\n"


@pytest.mark.skipif(cpu.cgroup_cpus() is not None or len(os.sched_getaffinity(0)) < 2,
                    reason="measured on an affinity set of two CPUs or more, without a cgroup quota")
def test_a_process_that_keeps_a_core_busy_costs_a_thread(tmp_path, monkeypatch):
    """A busy loop in another process (not a vaeflow job: no slot) keeps one of this job's CPUs busy: the next
    count leaves it that CPU; when it ends, the thread comes back."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    busy = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "busy"
        with cpu.CpuShare("beside", folder=tmp_path / "jobs") as share:
            assert share.jobs == 1
            threading.Event().wait(1.5)
            share.refresh(force=True)
            assert share.others >= 0.5, share.others
            assert share.threads <= share.cpus - 1 and torch.get_num_threads() == share.threads
            busy.kill()
            busy.wait()
            share.refresh(force=True)  # starts a clean interval
            threading.Event().wait(1.5)
            share.refresh(force=True)
            assert share.others < 0.5 and share.threads == share.cpus
    finally:
        busy.kill()
        busy.wait()


def test_the_engine_takes_its_share_and_records_it(tmp_path, monkeypatch, holder):
    """A training beside another job uses half the CPUs (4 assumed), records it, and gives torch its count back."""
    from vaeflow.core.checkpoint import read_metrics
    from vaeflow.core.engine import Trainer

    start, folder = holder
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(folder.parent))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    monkeypatch.setattr(cpu, "cpu_busy_seconds", lambda cpus: None)  # jobs only: the holder's start-up is not load
    start()
    cfg = validate({
        "data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 64, "n_test": 16}},
        "model": {"latent_dim": 2, "encoder": {"name": "mlp", "hidden": [16]}, "decoder": {"name": "mlp", "hidden": [16]},
                  "likelihood": {"name": "bernoulli"}},
        "train": {"epochs": 2, "batch_size": 32, "device": "cpu", "progress": False, "log_every": 1},
    })
    before = torch.get_num_threads()
    result = Trainer(cfg, tmp_path / "run").fit()
    assert [r["threads"] for r in read_metrics(tmp_path / "run")] == [2, 2]
    assert result.final["threads"] == 2
    assert torch.get_num_threads() == before
    assert cpu.running_jobs(folder) == 1  # the engine's slot is gone, the holder's remains


def test_a_slot_that_cannot_be_written_keeps_no_descriptor_or_file(tmp_path, monkeypatch):
    """A full disk between making the slot file and writing it: the job runs as if alone, its descriptor is
    closed and the half-made file removed."""
    import errno

    folder = tmp_path / "jobs"

    class FullDisk:
        """core.cpu's view of os, whose write fails as on a full disk (os itself is left alone)."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_in_folder() -> list[str]:
        """Descriptors of this process that point into the slot folder."""
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass  # closed meanwhile (listdir's own descriptor)
        return [t for t in targets if t.startswith(str(folder))]

    monkeypatch.setattr(cpu, "os", FullDisk())
    with cpu.CpuShare("x", folder=folder) as share:
        assert share.fd is None and share.jobs == 1
        assert open_in_folder() == []
    assert not list(folder.iterdir())


def test_a_count_too_soon_after_the_last_keeps_the_older_sample(tmp_path, monkeypatch):
    """Other processes' use is measured over at least half a refresh interval: a count that comes sooner keeps
    the earlier sample, so the interval keeps growing instead of starting again."""
    clock = {"now": 100.0}
    busy = {"s": 0.0}
    monkeypatch.setattr(cpu, "time", SimpleNamespace(monotonic=lambda: clock["now"], process_time=lambda: 0.0,
                                                     time=time.time))
    monkeypatch.setattr(cpu, "cpu_busy_seconds", lambda cpus: busy["s"])
    share = cpu.CpuShare("x", folder=tmp_path / "jobs")
    share.affinity = {0, 1}
    assert share._others() == 0.0  # the first sample: nothing to compare with
    clock["now"], busy["s"] = 100.2, 0.6  # too soon (and a burst)
    assert share._others() == 0.0 and share.sample[0] == 100.0
    clock["now"], busy["s"] = 101.0, 1.0  # one CPU kept busy, on average, over the whole second since the first sample
    assert share._others() == pytest.approx(1.0) and share.sample[0] == 101.0  # restarting at 100.2 would give 0.5
