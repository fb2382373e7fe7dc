"""End-to-end CLI on the tiny config: train, evaluate, generate, interpolate; plus layering rules."""

from __future__ import annotations

import ast
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid
from typer.testing import CliRunner

from core import load_model
from core.data import known_factors, load_split
from core.metrics import evaluate
from pipelines.cli import app

from conftest import ROOT, TINY, VAEFLOW

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(app, ["train", str(TINY), "--out", str(run), "--set", "train.epochs=2",
                              "--set", "data.dataset.n_train=1024", "--set", "train.progress=false"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(run) and summary["steps"] == 2 * 1024 // 64
    return run


def to_uint8(grid: torch.Tensor) -> np.ndarray:
    """What torchvision.utils.save_image writes for a [0, 1] grid (C, H, W)."""
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


def test_generate_writes_the_decoded_prior_samples(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(run_dir), "-n", "16", "--out", str(out), "--seed", "5"])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (4 * 34 + 2, 4 * 34 + 2, 3)  # 4x4 grid of 32x32 images, padding 2
    model, _ = load_model(run_dir)
    z = torch.randn(16, model.latent_dim, generator=torch.Generator().manual_seed(5))
    want = to_uint8(make_grid(torch.sigmoid(model.decode(z)).detach(), nrow=4, padding=2))
    assert np.abs(png.astype(int) - want.astype(int)).max() <= 1  # same z, same decoder: same pixels


def test_interpolate_rows_run_between_two_reconstructions(run_dir, tmp_path):
    out = tmp_path / "interp.png"
    res = runner.invoke(app, ["interpolate", "--model", str(run_dir), "--pairs", "3", "--steps", "5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    png = np.asarray(Image.open(out).convert("L")).astype(float) / 255
    assert png.shape == (3 * 34 + 2, 5 * 34 + 2)
    model, cfg = load_model(run_dir)
    test = load_split(cfg, "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:6]
    first = model.reconstruct(test[idx[:3]])  # (3, 1, 32, 32)
    last = model.reconstruct(test[idx[3:]])
    for row in range(3):
        top = 2 + row * 34
        left_tile = png[top : top + 32, 2 : 2 + 32]
        right_tile = png[top : top + 32, 2 + 4 * 34 : 2 + 4 * 34 + 32]
        assert np.abs(left_tile - first[row, 0].numpy()).max() < 1 / 255 + 1e-6
        assert np.abs(right_tile - last[row, 0].numpy()).max() < 1 / 255 + 1e-6


def test_evaluate_json_matches_the_library(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["evaluate", str(run_dir), "--out", str(out), "--set", "eval.iwae_k=16"])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    model, cfg = load_model(run_dir)
    cfg.eval.iwae_k = 16
    want = evaluate(model, load_split(cfg, "test"), cfg.eval, **known_factors(cfg))
    assert got.keys() == want.keys() and "disentanglement/mig" in got  # shapes has known factors
    for key in ("neg_elbo_nats", "iwae_nll_nats", "mse", "psnr", "active_units", "disentanglement/mig",
                "disentanglement/sap"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["iwae_k"] == 16 and got["examples"] == 256
    assert "iwae_nll_nats" in res.stdout and f"wrote {out}" in res.stdout
    assert math.isclose(got["neg_elbo_nats"], got["reconstruction_nats"] + got["kl_nats"], rel_tol=1e-6)


def test_bad_output_and_missing_model_exit_2(run_dir, tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(run_dir), "--out", str(tmp_path / "x.gif")])
    assert res.exit_code == 2 and ".png" in res.stderr
    assert not (tmp_path / "x.gif").exists()
    res = runner.invoke(app, ["interpolate", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("name: conv", "name: convv", 1))
    proc = subprocess.run([VAEFLOW, "train", str(bad), "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.encoder: unknown encoder 'convv'; known encoders: conv, mlp" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_imports_no_plugin_and_no_pipeline():
    for path in sorted((ROOT / "core").rglob("*.py")):
        bad = imports_of(path) & {"plugins", "pipelines"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        assert "pipelines" not in imports_of(path), path


def test_render_traversals_from_a_run_dir(run_dir, tmp_path):
    res = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "r"),
                              "--kind", "traversal", "--kind", "phase"])
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / "r" / "traversal" / "traversal.json").read_text())
    _, cfg = load_model(run_dir)
    assert sorted(info["order"]) == list(range(cfg.model.latent_dim))  # every dimension, ordered by KL
    kl = info["kl_per_dim"]
    assert [kl[j] for j in info["order"]] == sorted(kl, reverse=True)
    assert (tmp_path / "r" / "phase" / "phase.png").stat().st_size > 0
    assert not (tmp_path / "r" / "interpolation").exists()  # only the renderers asked for
    bad = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "x"), "--kind", "nope"])
    assert bad.exit_code == 2 and "unknown renderer 'nope'" in bad.stderr
    vq_only = runner.invoke(app, ["render", "--model", str(run_dir), "--out", str(tmp_path / "y"), "--kind", "discrete"])
    assert vq_only.exit_code == 2 and "discrete" in vq_only.stderr
