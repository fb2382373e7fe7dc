"""DDP through torchrun with gloo on CPU: 2 processes on half-batches match 1 process on the full batch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from vaeflow.core.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, load_checkpoint, read_metrics
from vaeflow.core.config import load_config
from vaeflow.core.engine import train

from conftest import TINY, VAEFLOW, run_result

# A deterministic autoencoder: no sampling noise, so the only difference between the runs is
# DDP's gradient all-reduce over two half-batches versus one process on the whole batch.
SETS = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.epochs=2", "train.batch_size=64",
        "train.progress=false", "train.log_every=2", "model.kind=ae", "model.likelihood={name: gaussian, sigma: 0.5}",
        "train.grad_clip=50"]


def test_two_ddp_processes_match_one_process_on_the_global_batch(tmp_path):
    train(load_config(TINY, SETS), tmp_path / "single")
    args = [a for s in SETS for a in ("--set", s)]
    proc = subprocess.run([VAEFLOW, "train", str(TINY), "--out", str(tmp_path / "ddp"), *args, "--nproc", "2", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = load_file(tmp_path / "single" / WEIGHTS_FILE)
    ddp = load_file(tmp_path / "ddp" / WEIGHTS_FILE)
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    # and both moved away from the shared initialization, so the comparison is not vacuous
    from vaeflow.core.model import build_model

    torch.manual_seed(0)
    init = build_model(load_config(TINY, SETS)).state_dict()
    assert all((single[k] - init[k]).abs().max() > 1e-3 for k in single if k.endswith("weight"))
    state = load_checkpoint(tmp_path / "ddp" / CHECKPOINT_FILE)
    assert state["step"] == 2 * 256 // 64  # global steps, not per-rank
    assert [r["epoch"] for r in read_metrics(tmp_path / "ddp")] == [1, 2]  # rank 0 alone wrote them
    assert proc.stdout.count('"run_dir"') == 1  # one summary line, from rank 0


def test_ranks_partition_every_global_batch():
    from vaeflow.core.data import Batches

    cfg = load_config(TINY, SETS + ["data.dataset.n_train=100", "train.batch_size=32"])
    images = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)  # image i holds the value i
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    full = [b.flatten().long() for b in Batches(cfg, "train", torch.device("cpu"), images=images).epoch(perm)]
    shards = [[b.flatten().long() for b in Batches(cfg, "train", torch.device("cpu"), images=images).epoch(perm, 0, r, 2)]
              for r in range(2)]
    assert len(full) == len(shards[0]) == len(shards[1]) == 4  # 32, 32, 32, 4
    for i, batch in enumerate(full):
        a, b = shards[0][i], shards[1][i]
        assert len(a) + len(b) == len(batch) and abs(len(a) - len(b)) <= 1
        assert torch.equal(torch.cat([a, b]), batch)  # disjoint halves, in order, covering the batch


def test_pipeline_train_stage_runs_data_parallel_with_rank_0_logging(tmp_path):
    """`train.nproc: 2` inside `vaeflow run`: two gloo processes match one process, and MLflow gets each epoch once."""
    import json
    import os

    from mlflow.tracking import MlflowClient

    from vaeflow.core.engine import Trainer
    from vaeflow.core.manifest import load_prepared

    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "VAEFLOW_HOME": str(project), "PREFECT_HOME": str(project / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    sets = SETS + ["train.nproc=2", "tracking.model_name=ddp"]
    proc = subprocess.run([VAEFLOW, "run", str(TINY), *[a for s in sets for a in ("--set", s)], "--until", "train", "--json"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = run_result(proc.stdout)
    run_dir = Path(out["run_dir"])
    reference = tmp_path / "single"
    Trainer(load_config(TINY, SETS), reference, train_images=load_prepared(out["data"]["folder"])["train"]).fit()
    single, ddp = load_file(reference / WEIGHTS_FILE), load_file(run_dir / WEIGHTS_FILE)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (train_run,) = c.search_runs([c.get_experiment_by_name("vaeflow").experiment_id], "tags.stage = 'train'")
    assert [m.step for m in c.get_metric_history(train_run.info.run_id, "epoch/loss")] == [1, 2]  # rank 0 alone
    assert len(c.get_metric_history(train_run.info.run_id, "train/loss")) == 2 * 256 // 64 // 2  # every log_every=2
    assert "data-parallel processes" in proc.stderr + proc.stdout and "rank 0: epoch 2/2" in proc.stderr + proc.stdout
