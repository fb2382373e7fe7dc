"""Training engine: learning, determinism, exact resume after SIGKILL, NaN guard, atomic files."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from vaeflow.core import load_model
from vaeflow.core.checkpoint import CHECKPOINT_FILE, WEIGHTS_FILE, load_checkpoint, read_metrics
from vaeflow.core.config import load_config
from vaeflow.core.data import load_split
from vaeflow.core.engine import Trainer, train
from vaeflow.core.errors import CheckpointError, NonFiniteError
from vaeflow.core.metrics import evaluate
from vaeflow.core.model import build_model
from vaeflow.pipelines.cli import app

from conftest import TINY, VAEFLOW, CrashAt

SMALL = ["data.dataset.n_train=512", "data.dataset.n_test=64", "train.epochs=2", "train.progress=false",
         "train.log_every=4", "eval.iwae_k=8"]


def small(*extra: str):
    return load_config(TINY, SMALL + list(extra))


def test_training_improves_the_elbo(tmp_path):
    cfg = small("train.epochs=4", "data.dataset.n_train=1024")
    torch.manual_seed(cfg.train.seed)
    untrained = evaluate(build_model(cfg), load_split(cfg, "test"), cfg.eval)
    result = train(cfg, tmp_path / "run")
    model, _ = load_model(tmp_path / "run")
    trained = evaluate(model, load_split(cfg, "test"), cfg.eval)
    assert trained["neg_elbo_nats"] < 0.6 * untrained["neg_elbo_nats"]
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["step"] == result.steps == 4 * 16
    assert not list((tmp_path / "run").rglob("*.tmp"))  # atomic writes leave no temp files


def test_same_seed_same_weights_and_different_seed_differs(tmp_path):
    train(small(), tmp_path / "a")
    train(small(), tmp_path / "b")
    train(small("train.seed=1"), tmp_path / "c")
    a, b, c = (tmp_path / d / WEIGHTS_FILE for d in "abc")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_stream_loader_matches_memory_path(tmp_path):
    train(small(), tmp_path / "mem")
    train(small("data.loader=stream", "data.num_workers=0"), tmp_path / "stream")
    wm, ws = load_file(tmp_path / "mem" / WEIGHTS_FILE), load_file(tmp_path / "stream" / WEIGHTS_FILE)
    assert all(torch.equal(wm[k], ws[k]) for k in wm)


def test_checkpoint_records_mid_epoch_position_and_rejects_another_config(tmp_path):
    cfg = small("train.epochs=3", "train.max_steps=21", "train.checkpoint_every=7")
    Trainer(cfg, tmp_path / "part").fit()  # 512 / 64 = 8 steps per epoch: stops in epoch 3 at batch 5
    state = load_checkpoint(tmp_path / "part" / CHECKPOINT_FILE)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (21, 2, 5)
    assert set(state) >= {"model", "optimizer", "scheduler", "beta", "rng", "config", "config_hash"}
    assert state["beta"] == {"step": 21}
    from vaeflow.core.checkpoint import write_run_config

    other = small("train.epochs=3", "train.lr=1e-4")
    write_run_config(tmp_path / "part", other)
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(other, tmp_path / "part", resume=True)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    sets = SMALL + ["train.epochs=3", "train.checkpoint_every=5", "data.dataset.n_train=2048", "train.batch_size=32"]
    args = [a for s in sets for a in ("--set", s)]
    done = subprocess.run([VAEFLOW, "train", str(TINY), "--out", str(tmp_path / "full"), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([VAEFLOW, "train", str(TINY), "--out", str(run), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / CHECKPOINT_FILE
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / WEIGHTS_FILE).exists(), "the run finished before it could be killed"
    state = load_checkpoint(ckpt)
    assert 0 < state["step"] < 3 * 64
    resumed = subprocess.run([VAEFLOW, "train", "--resume", str(run)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (run / WEIGHTS_FILE).read_bytes() == (tmp_path / "full" / WEIGHTS_FILE).read_bytes()
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


NAN_ENCODER = """
import torch
from vaeflow.core.hookspecs import hookimpl
from vaeflow.plugins.encoders import ConvEncoder

class NanAfter(ConvEncoder):
    name = "nan-after"
    calls = 0
    def forward(self, x):
        out = super().forward(x)
        if self.training:
            type(self).calls += 1
            if type(self).calls == 11:  # the 11th optimizer step
                out = out * float("nan")
        return out

@hookimpl
def register_encoders(register):
    register(NanAfter)
"""


def test_nan_guard_names_step_and_term_and_keeps_last_good_checkpoint(tmp_path, local_plugins):
    local_plugins({"vf_nan": NAN_ENCODER})
    cfg = small("model.encoder={name: nan-after, channels: [16, 32], hidden: 128}", "train.checkpoint_every=5")
    with pytest.raises(NonFiniteError) as info:
        train(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "at step 11" in msg and "loss became nan" in msg and "last good checkpoint" in msg
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT_FILE)
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def test_cli_errors_exit_2_without_traceback(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    train(small("train.epochs=1"), run)
    again = runner.invoke(app, ["train", str(TINY), "--out", str(run)])
    assert again.exit_code == 2 and "already holds a run" in again.stderr
    (run / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    bad = runner.invoke(app, ["train", "--resume", str(run)])
    assert bad.exit_code == 2 and "corrupt" in bad.stderr and "Traceback" not in bad.output
    weights = run / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    bad = runner.invoke(app, ["evaluate", "--model", str(run)])
    assert bad.exit_code == 2 and "corrupt" in bad.stderr
    for args in (["evaluate", "--model", str(tmp_path / "missing")], ["evaluate", str(tmp_path / "missing")], ["generate", "--model", str(tmp_path / "x")],
                 ["train"], ["train", "--resume", str(run), "--set", "train.epochs=3"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "Traceback" not in res.output


@pytest.mark.parametrize("extra", [
    ["train.bf16=true"],
    ["model.kind=ae", "model.likelihood={name: gaussian, sigma: 0.1}"],
    ["model.kind=dae", "model.noise={name: gaussian, std: 0.2}", "model.likelihood={name: gaussian-learned}"],
    ["train.beta={schedule: capacity, max_capacity: 5, capacity_steps: 20}", "train.lr_schedule=cosine", "train.warmup_steps=4", "train.grad_clip=10"],
    ["train.beta={schedule: cyclical, cycle_steps: 8}"],
    ["train.compile=true"],
])
def test_variants_train_to_finite_weights(tmp_path, extra):
    result = train(small("train.epochs=1", *extra), tmp_path / "run")
    weights = load_file(tmp_path / "run" / WEIGHTS_FILE)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert result.steps == 512 // 64
    model, cfg = load_model(tmp_path / "run")
    assert model.kind == cfg.model.kind


def test_warmup_cosine_schedule_matches_hand_formula(tmp_path):
    cfg = small("train.epochs=1", "train.lr_schedule=cosine", "train.warmup_steps=4")
    trainer = Trainer(cfg, tmp_path / "run")  # 8 steps in all
    lrs = []
    for _ in range(8):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    lr = cfg.train.lr
    want = [lr * (s + 1) / 4 for s in range(4)] + [lr * 0.5 * (1 + math.cos(math.pi * (s - 4) / 4)) for s in range(4, 8)]
    assert lrs == pytest.approx(want)


def test_resume_after_a_torn_metrics_line_rewrites_the_epoch(tmp_path):
    cfg = small()  # 8 steps per epoch, 2 epochs, a sync every 4 steps
    train(cfg, tmp_path / "full")
    run = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, run, callbacks=[CrashAt(12)]).fit()  # after epoch 1's checkpoint, inside epoch 2
    assert load_checkpoint(run / CHECKPOINT_FILE)["step"] == 8
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "step": 1')  # a crash in the middle of appending a line
    assert [r["epoch"] for r in read_metrics(run)] == [1]  # the torn line is skipped, not a crash
    Trainer(cfg, run, resume=True).fit()
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert (run / WEIGHTS_FILE).read_bytes() == (tmp_path / "full" / WEIGHTS_FILE).read_bytes()
    full = read_metrics(tmp_path / "full")
    for a, b in zip(read_metrics(run), full):  # the same loss terms as the uninterrupted run, timing aside
        assert {k: v for k, v in a.items() if k not in ("seconds", "img_per_s")} == \
               {k: v for k, v in b.items() if k not in ("seconds", "img_per_s")}


def test_progress_bar_names_the_epoch(tmp_path, capsys):
    train(small("train.epochs=2", "train.progress=true"), tmp_path / "run")
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "epoch 1/2" in bar and "epoch 2/2" in bar and "epoch 3/2" not in bar
