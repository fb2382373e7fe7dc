"""Crash hygiene and concurrency of `vaeflow run`, as real processes: kill -9 in train and in register, SIGTERM,
two identical runs at once in one folder. Each run uses Prefect's temporary server, as a single user's does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaeflow.core.checkpoint import CHECKPOINT_FILE
from conftest import TINY, VAEFLOW, run_result
from test_serve import store, wait_for

# 32 steps per epoch with checkpoints every 2: long enough to be killed mid-train, seconds to finish
SETS = ["data.dataset.n_train=2048", "data.dataset.n_test=64", "train.epochs=2", "eval.iwae_k=4",
        "train.progress=false", "train.checkpoint_every=2", "train.log_every=2", "quality.enabled=false"]


FLOW = "vaeflow_pipeline"  # the pipeline flow; with --until STAGE its MLflow parent run is `vaeflow_pipeline[STAGE] ...`


def args(*sets: str, until: str | None = None) -> list[str]:
    """`vaeflow run` of the tiny config: the whole pipeline, or with `until` that stage and what it needs."""
    return [VAEFLOW, "run", str(TINY), "--json", *[a for s in (*SETS, *sets) for a in ("--set", s)],
            *(["--until", until] if until else [])]


def env_for(project: Path, **extra: str) -> dict:
    """A single user's environment: the project's sqlite store, Prefect's temporary server in one PREFECT_HOME."""
    env = {**os.environ, "VAEFLOW_HOME": str(project), "PREFECT_HOME": str(project / "prefect-home"), **extra}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return env


def start(project: Path, *sets: str, until: str | None = None, **extra: str) -> subprocess.Popen:
    log = project / f"run-{time.monotonic_ns()}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args(*sets, until=until), cwd=project, env=env_for(project, **extra), stdout=fh,
                                stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text()


def mid_train(proc: subprocess.Popen, project: Path) -> Path:
    """Wait until the run has written a training checkpoint (it must still be running)."""
    def ready():
        assert proc.poll() is None, output(proc)[-3000:]
        return checkpoint(project)

    return wait_for(ready, 300, "a training checkpoint")


def stopped(pid: int) -> bool:
    """Whether process pid is stopped by a signal (state T in /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return output(proc)


def children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def servers_of(pid: int) -> list[int]:
    """The temporary Prefect servers (uvicorn processes) started by process pid."""
    out = []
    for child in children(pid):
        try:
            if b"uvicorn" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
        except OSError:
            pass
    return out


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def checkpoint(project: Path) -> Path | None:
    found = list((project / ".vaeflow" / "train").glob(f"*/{CHECKPOINT_FILE}"))
    return found[0] if found else None


def runs_by_status(project: Path) -> dict[str, list]:
    c = store(project)
    exp = c.get_experiment_by_name("vaeflow")
    out: dict[str, list] = {}
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        out.setdefault(r.info.status, []).append(r)
    return out


@pytest.fixture
def project(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    return folder


def test_kill_9_mid_train_leaves_nothing_running_and_the_rerun_resumes(project):
    from vaeflow.core.checkpoint import WEIGHTS_FILE
    from vaeflow.core.config import load_config
    from vaeflow.core.engine import Trainer
    from vaeflow.core.manifest import load_prepared

    proc = start(project, "tracking.model_name=killed-in-train", until="train")
    ckpt = mid_train(proc, project)
    servers = servers_of(proc.pid)
    assert servers, "vaeflow run started no temporary Prefect server"
    proc.kill()  # SIGKILL: no handler, no atexit
    proc.wait()
    wait_for(lambda: all(gone(p) for p in servers), 30, "the watchdog to stop the orphaned temporary server")
    running = runs_by_status(project).get("RUNNING", [])
    # the parent run (until train) and its train stage; prepare_data had finished
    assert {r.data.tags["mlflow.runName"].split()[0] for r in running} == {f"{FLOW}[train]", "train"}
    parent = next(r for r in running if r.data.tags["mlflow.runName"].startswith(FLOW))
    assert parent.data.tags["mlflow.runName"] == f"{FLOW}[train] {TINY.stem}" and parent.data.tags["vaeflow.until"] == "train"

    again = start(project, "tracking.model_name=killed-in-train", until="train")
    text = finish(again)
    assert again.returncode == 0, text[-3000:]
    status = runs_by_status(project)
    assert "RUNNING" not in status
    killed = status["KILLED"]  # the dead process's runs, ended by the next run in the workspace
    assert {r.info.run_id for r in killed} == {r.info.run_id for r in running}
    assert all("died" in r.data.tags["error"] for r in killed)
    # the re-run resumed from the checkpoint: the weights equal an uninterrupted run's, byte for byte
    run_dir = ckpt.parents[len(Path(CHECKPOINT_FILE).parts) - 1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    cfg = load_config(TINY, SETS + ["tracking.model_name=killed-in-train"])
    data = next((project / ".vaeflow" / "data").iterdir())
    reference = project / "uninterrupted"
    Trainer(cfg, reference, train_images=load_prepared(data)["train"]).fit()
    assert (run_dir / WEIGHTS_FILE).read_bytes() == (reference / WEIGHTS_FILE).read_bytes()


def test_kill_9_between_version_and_aliases_then_rerun_completes_the_same_version(project):
    name = "killed-in-register"
    dead = start(project, f"tracking.model_name={name}", VAEFLOW_FAILPOINT="register.after_version")
    text = finish(dead)
    assert dead.returncode == -signal.SIGKILL, text[-3000:]
    c = store(project)
    (version,) = c.search_model_versions(f"name='{name}'")
    assert version.status == "READY" and not c.get_registered_model(name).aliases  # the half-finished state
    register_run = c.get_run(version.run_id)
    assert register_run.info.status == "RUNNING"  # it never got to end: the run ends only after the aliases

    again = start(project, f"tracking.model_name={name}")
    text = finish(again)
    assert again.returncode == 0, text[-3000:]
    versions = c.search_model_versions(f"name='{name}'")
    assert [int(v.version) for v in versions] == [1]  # same weights sha256: no duplicate version
    assert c.get_registered_model(name).aliases == {"candidate": 1, "champion": 1}
    assert c.get_run(version.run_id).info.status == "KILLED"
    assert "RUNNING" not in runs_by_status(project)
    assert '"reused": true' in text


def test_sigterm_ends_runs_killed_stops_the_server_and_says_how_to_rerun(project):
    proc = start(project, "tracking.model_name=terminated", until="train")
    mid_train(proc, project)
    servers = servers_of(proc.pid)
    assert servers
    proc.send_signal(signal.SIGTERM)
    text = finish(proc, timeout=120)
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text
    assert "interrupted" in text and f"vaeflow run {TINY}" in text and "--until train" in text and "--resume" not in text
    assert all(gone(p) for p in servers)  # stopped on the way out, not left to the watchdog
    status = runs_by_status(project)
    assert "RUNNING" not in status
    assert {r.data.tags["mlflow.runName"].split()[0] for r in status["KILLED"]} == {f"{FLOW}[train]", "train"}


def test_two_identical_runs_at_once_train_once(project):
    """The second run reaches train while the first holds the stage lock (the first pauses itself after its first
    epoch, outside any store transaction, until the second says it waits), so the outcome does not depend on which
    one starts faster. A SIGSTOP sent from here could land inside a sqlite write and lock the second run out."""
    sets = ("tracking.model_name=twins", "data.dataset.n_train=8192")
    first = start(project, *sets, VAEFLOW_FAILPOINT="train.epoch:stop")

    def paused():
        assert first.poll() is None, output(first)[-3000:]
        return stopped(first.pid)

    wait_for(paused, 300, "the first run to pause after its first epoch")
    try:
        second = start(project, *sets)

        def waiting():
            assert second.poll() is None, output(second)[-3000:]
            return "being computed by another run" in output(second)

        wait_for(waiting, 300, "the second run to wait for the first one's train stage")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    texts = [finish(first), finish(second)]
    for proc, text in zip((first, second), texts):
        assert proc.returncode == 0, text[-3000:]
    results = [run_result(text) for text in texts]
    assert results[0]["run_dir"] == results[1]["run_dir"]
    records = [json.loads(line) for line in (Path(results[0]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # each epoch once: one process trained, the other waited
    c = store(project)
    train_runs = [r for rs in runs_by_status(project).values() for r in rs if r.data.tags.get("stage") == "train"]
    trained = [r for r in train_runs if c.get_metric_history(r.info.run_id, "train/loss")]
    assert len(train_runs) == 2 and len(trained) == 1
    assert [int(v.version) for v in c.search_model_versions("name='twins'")] == [1]


def test_the_start_up_timeout_is_in_force_before_prefect_reads_it():
    """Prefect reads its settings at import; vaeflow's default must already be set by then."""
    code = ("import vaeflow.pipelines.pipeline; from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as s; "
            "print(s.value())")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out.strip().splitlines()[-1]) == 180
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "33"  # a user's own value wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out.strip().splitlines()[-1]) == 33
