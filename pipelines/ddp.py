"""Data-parallel training inside the pipeline: the train stage runs the engine under torchrun with train.nproc
processes (NCCL on GPUs, gloo on CPU), as `vaeflow train --nproc` does. Rank 0 alone logs to the stage's MLflow
run and writes the run folder; every rank's output comes back as the stage's Prefect log lines.

    python -m torch.distributed.run --standalone --nproc_per_node N -m vaeflow.pipelines.ddp JOB.json   # one rank
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from vaeflow.core.config import Config, canonical_json

JOB_FILE = "ddp-job.json"


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so ranks never outlive a killed stage."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def threads_per_rank(cfg: Config) -> int:
    """train.num_threads, else the CPUs this process may use shared evenly among the ranks."""
    return cfg.train.num_threads or max(1, len(os.sched_getaffinity(0)) // cfg.train.nproc)


def train_ddp(cfg: Config, run_dir: Path, data_folder: str, resume: bool, run_id: str, log) -> None:
    """Train run_dir with cfg.train.nproc torchrun processes; their output goes to `log` line by line."""
    from vaeflow.core.errors import VaeflowError
    from vaeflow.pipelines.tracking import tracking_uri

    run_dir.mkdir(parents=True, exist_ok=True)
    job = {"config": json.loads(canonical_json(cfg)), "run_dir": str(run_dir), "data": data_folder,
           "resume": resume, "run_id": run_id, "tracking_uri": tracking_uri()}
    (run_dir / JOB_FILE).write_text(json.dumps(job))
    n = cfg.train.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "vaeflow.pipelines.ddp", str(run_dir / JOB_FILE)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank(cfg)), "PYTHONUNBUFFERED": "1"}
    log.info("training with %d data-parallel processes (torchrun, %d threads each)", n, threads_per_rank(cfg))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
    for line in proc.stdout:
        if line.strip():
            log.info("%s", line.rstrip())
    if proc.wait() != 0:
        raise VaeflowError(f"data-parallel training (train.nproc={n}) failed: torchrun exited with {proc.returncode}; "
                           f"see the lines above")


def main(job_file: str) -> None:
    """One rank: the engine on the prepared split; rank 0 logs to MLflow and prints an epoch line."""
    from mlflow.tracking import MlflowClient

    from vaeflow.core.config import validate
    from vaeflow.core.engine import Trainer
    from vaeflow.core.manifest import load_prepared
    from vaeflow.pipelines.pipeline import EpochLog, constant_terms
    from vaeflow.pipelines.tracking import MetricsLogger

    die_with_parent()
    job = json.loads(Path(job_file).read_text())
    cfg = validate(job["config"])
    logging.basicConfig(level=logging.INFO, format="rank %(rank)s: %(message)s", stream=sys.stdout, force=True)
    log = logging.LoggerAdapter(logging.getLogger("vaeflow.ddp"), {"rank": os.environ.get("RANK", "0")})
    client = MlflowClient(job["tracking_uri"])
    callbacks = [MetricsLogger(client, job["run_id"], constant=constant_terms(cfg)), EpochLog(log, cfg.train.epochs)]
    trainer = Trainer(cfg, job["run_dir"], resume=job["resume"], train_images=load_prepared(job["data"])["train"],
                      callbacks=callbacks)  # the engine keeps callbacks on rank 0 only
    trainer.fit()


if __name__ == "__main__":
    main(sys.argv[1])
