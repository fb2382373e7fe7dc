"""core.cpu: each CPU job's share of the usable CPUs, counted from slot files that die with their process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

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
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)  # whatever this machine has: 4 CPUs, 2 jobs, 2 each
    assert cpu.running_jobs(folder) == 0
    with cpu.CpuShare("here", folder=folder) as share:
        assert cpu.running_jobs(folder) == 1 and share.jobs == 1 and share.threads == 4 == torch.get_num_threads()
    other = start()
    with cpu.CpuShare("here", folder=folder) as share:
        assert share.jobs == 2 and share.threads == 2 == torch.get_num_threads()
    other.stdin.write("done\n")
    other.stdin.flush()
    other.wait()
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


def test_jobs_of_one_process_in_threads_count_apart(tmp_path, monkeypatch):
    """Evaluate and render of one stage graph start together: each counts the other (SETTLE_SECONDS)."""
    folder = tmp_path / "jobs"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "SETTLE_SECONDS", 3.0)  # a loaded CI host may start the two threads far apart
    seen, ready, release = [], threading.Barrier(2), threading.Event()

    def job():
        with cpu.CpuShare("stage", folder=folder) as share:
            ready.wait()
            seen.append((cpu.running_jobs(folder), share.jobs))
            release.wait()

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 2:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert seen == [(2, 2), (2, 2)]


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


def test_the_engine_takes_its_share_and_records_it(tmp_path, monkeypatch, holder):
    """A training beside another job uses half the CPUs (4 assumed), records it, and gives torch its count back."""
    from vaeflow.core.checkpoint import read_metrics
    from vaeflow.core.engine import Trainer

    start, folder = holder
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(folder.parent))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
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


TINY = {
    "data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 64, "n_test": 16}},
    "model": {"latent_dim": 2, "encoder": {"name": "mlp", "hidden": [16]}, "decoder": {"name": "mlp", "hidden": [16]},
              "likelihood": {"name": "bernoulli"}},
    "train": {"epochs": 3, "batch_size": 16, "device": "cpu", "progress": False, "log_every": 1},
}


def test_the_count_is_fixed_for_the_whole_training(tmp_path, monkeypatch, holder):
    """Another job that starts while a training runs does not change its thread count (another count would round
    the reductions differently); the next job to start counts both."""
    from vaeflow.core.checkpoint import read_metrics
    from vaeflow.core.engine import Trainer

    start, folder = holder
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(folder.parent))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    seen = []

    class StartAnother:
        def on_log(self, step, record):
            seen.append(torch.get_num_threads())
            if step == 2:
                start()
                assert cpu.running_jobs(folder) == 2

    Trainer(validate(TINY), tmp_path / "run", callbacks=[StartAnother()]).fit()
    assert len(seen) == 12 and set(seen) == {4}
    assert [r["threads"] for r in read_metrics(tmp_path / "run")] == [4, 4, 4]
    with cpu.CpuShare("next", folder=folder) as share:
        assert share.jobs == 2 and share.threads == 2


def test_a_resume_keeps_the_count_its_run_started_with(tmp_path, monkeypatch, holder, caplog):
    """A run started beside another job (2 of 4 CPUs) and killed is resumed alone: it keeps 2 threads, so it rounds
    as the uninterrupted run would; the checkpoint records the count."""
    import logging

    from vaeflow.core.checkpoint import load_checkpoint, read_metrics
    from vaeflow.core.engine import CHECKPOINT_FILE, Trainer, resume

    start, folder = holder
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(folder.parent))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    other = start()

    class Crash(Exception):
        pass

    class CrashAfterFirstEpoch:
        def on_epoch(self, record):
            raise Crash  # after the epoch's checkpoint, as a kill would leave it

    with pytest.raises(Crash):
        Trainer(validate(TINY), tmp_path / "run", callbacks=[CrashAfterFirstEpoch()]).fit()
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["threads"] == 2
    other.kill()
    other.wait()
    with caplog.at_level(logging.INFO, logger="vaeflow.cpu"):
        resume(tmp_path / "run")
    assert [r["threads"] for r in read_metrics(tmp_path / "run")] == [2, 2, 2]
    assert "kept on resume" in caplog.text
    with cpu.CpuShare("alone now", folder=folder) as share:
        assert share.jobs == 1 and share.threads == 4  # a new job takes every CPU


def test_a_resume_on_fewer_cpus_takes_its_share_and_says_so(tmp_path, monkeypatch, holder):
    """A run trained with 4 threads and resumed where 2 CPUs are usable does not run 4 threads on 2 CPUs: it takes
    the share and warns that its rounding differs; inside a pipeline stage's share the lines reach the stage's
    report (its Prefect log), the start's and the resume's alike."""
    import logging

    from vaeflow.core.checkpoint import load_checkpoint, read_metrics
    from vaeflow.core.engine import CHECKPOINT_FILE, Trainer, resume

    start, folder = holder
    monkeypatch.setenv("VAEFLOW_CACHE_DIR", str(folder.parent))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)

    class Crash(Exception):
        pass

    class CrashAfterFirstEpoch:
        def on_epoch(self, record):
            raise Crash

    with pytest.raises(Crash):
        Trainer(validate(TINY), tmp_path / "run", callbacks=[CrashAfterFirstEpoch()]).fit()
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)["threads"] == 4
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)
    said = []
    with cpu.cpu_share("train", report=lambda level, message: said.append((level, message))):
        resume(tmp_path / "run")
    assert [r["threads"] for r in read_metrics(tmp_path / "run")] == [4, 2, 2]
    assert [level for level, _ in said] == [logging.INFO, logging.WARNING]
    assert "2 CPU thread(s) for the whole job (2 usable CPUs shared by 1 CPU job(s)" in said[0][1]
    assert "trained with 4 CPU threads" in said[1][1] and "goes on with 2" in said[1][1]

    # with room for it, the resumed count is kept, and the stage's report says so
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    with pytest.raises(Crash):
        Trainer(validate(TINY), tmp_path / "again", callbacks=[CrashAfterFirstEpoch()]).fit()
    other = start()  # resumed beside another job: its share would be 2, the run keeps 4
    said.clear()
    with cpu.cpu_share("train", report=lambda level, message: said.append((level, message))):
        resume(tmp_path / "again")
    other.kill()
    other.wait()
    assert [r["threads"] for r in read_metrics(tmp_path / "again")] == [4, 4, 4]
    assert "2 CPU thread(s)" in said[0][1] and "4 CPU thread(s)" in said[1][1] and "kept on resume" in said[1][1]


def test_set_waiting_policy_by_hand(monkeypatch):
    """vaeflow bounds the spinning unless the user chose a policy, or torch (with libgomp) loaded first."""
    monkeypatch.setattr(cpu, "waiting", cpu.waiting)  # this process's own record, restored after
    env: dict[str, str] = {}
    assert "GOMP_SPINCOUNT=1000" in cpu.set_waiting_policy(env, {}) and env == {"GOMP_SPINCOUNT": "1000"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert "exported" in cpu.set_waiting_policy(env, {}) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"GOMP_SPINCOUNT": "50"}
    assert "exported" in cpu.set_waiting_policy(env, {}) and env == {"GOMP_SPINCOUNT": "50"}
    env = {"GOMP_SPINCOUNT": "1000"}  # inherited from the vaeflow process that started this one
    assert "vaeflow's default" in cpu.set_waiting_policy(env, {})
    assert cpu.exported_waiting({"GOMP_SPINCOUNT": "1000"}) == {}
    assert cpu.exported_waiting({"GOMP_SPINCOUNT": "50", "OMP_WAIT_POLICY": "PASSIVE", "X": "1"}) == \
        {"GOMP_SPINCOUNT": "50", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    assert "before vaeflow" in cpu.set_waiting_policy(env, {"torch": object()}) and env == {}


@pytest.mark.parametrize("exported, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "20000"}, "20000"),
                                                ({"OMP_WAIT_POLICY": "PASSIVE"}, None)])
def test_import_vaeflow_sets_the_policy_before_torch_loads(exported, expected):
    """`import vaeflow` (the CLI's and a flow run's first import) sets GOMP_SPINCOUNT without loading torch, so
    libgomp, which reads it once when torch loads it, sees it; the user's own setting is kept."""
    code = ("import os, sys\nimport vaeflow\nloaded = 'torch' in sys.modules\nimport torch\n"
            "print(loaded, os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k not in cpu.WAIT_SETTINGS}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **exported}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", str(expected)]
