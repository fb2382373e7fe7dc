"""`vaeflow bench train`: the report is consistent with its own raw values; no assertion is about speed."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from vaeflow.core.config import validate
from vaeflow.core.errors import VaeflowError
from vaeflow.core.model import build_model
from vaeflow.pipelines import bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One tiny benchmark run (2 repeats of 20 steps, 1 thread): (returned dict, path of the JSON file)."""
    tmp = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAEFLOW_DATA_DIR", str(tmp / "cache"))  # decompress into tmp, never $HOME
        out = tmp / "out" / "train.json"
        return bench.bench_train(out=out, repeats=2, steps=20, threads=1, steady_repeats=0), out


def test_file_holds_the_returned_dict(report):
    result, out = report
    assert out.is_file()
    assert json.loads(out.read_text()) == result
    assert not list(out.parent.glob(".*.tmp"))  # the atomic write left no temp file


def test_medians_are_of_the_raw_values(report):
    result, _ = report
    raw = result["raw"]
    for key in ("engine_img_per_s", "reference_img_per_s", "matmul_gflops"):
        assert len(raw[key]) == result["repeats"] == 2
        assert all(math.isfinite(v) and v > 0 for v in raw[key])
        assert result[key] == statistics.median(raw[key])


def test_ratios_follow_from_the_medians(report):
    result, _ = report
    engine = statistics.median(result["raw"]["engine_img_per_s"])
    reference = statistics.median(result["raw"]["reference_img_per_s"])
    roofline = result["matmul_gflops"] * 1e9 / result["flops_per_image"]
    assert result["speedup"] == pytest.approx(engine / reference, rel=1e-12)
    assert result["roofline_img_per_s"] == pytest.approx(roofline, rel=1e-12)
    assert result["roofline_fraction"] == pytest.approx(engine / roofline, rel=1e-12)
    assert result["reference_roofline_fraction"] == pytest.approx(reference / roofline, rel=1e-12)


def test_settings_are_stated(report):
    result, _ = report
    assert result["flops_per_image"] == 3_907_200
    assert (result["threads"], result["batch_size"], result["steps"], result["repeats"]) == (1, 128, 20, 2)
    assert result["dataset"] == ("fashion-mnist" if bench.fashion_mnist_available() else "shapes")
    assert result["torch_version"] == torch.__version__
    cfg = result["config"]
    assert cfg["device"] == "cpu" and cfg["torch_num_threads"] == 1
    assert "num_workers=0" in cfg["reference"]["data"]
    run = cfg["engine"]["run_config"]["train"]
    assert (run["max_steps"], run["batch_size"], run["progress"], run["checkpoint_every"]) == (20, 128, False, None)


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(VaeflowError, match="must be >= 1"):
        bench.bench_train(out=tmp_path / "x.json", repeats=0, steps=20, threads=1)
    with pytest.raises(VaeflowError, match="steady epochs >= 2"):
        bench.bench_train(out=tmp_path / "x.json", repeats=1, steps=20, threads=1, steady_epochs=1)
    assert not (tmp_path / "x.json").exists()


def test_shapes_fallback(tmp_path, monkeypatch):
    """Without Fashion-MNIST the same report comes from shapes at 28x28, with one epoch covering the steps."""
    monkeypatch.setattr(bench, "fashion_mnist_available", lambda: False)
    threads = torch.get_num_threads()
    result = bench.bench_train(out=tmp_path / "shapes.json", repeats=1, steps=10, threads=1, steady_epochs=2,
                               steady_repeats=1)
    assert torch.get_num_threads() == threads  # the process setting is restored
    assert result["dataset"] == "shapes" and result["config"]["dataset"]["image_size"] == 28
    assert result["train_images"] >= 10 * 128
    assert result["flops_per_image"] == 3_907_200
    assert result["speedup"] == result["engine_img_per_s"] / result["reference_img_per_s"]
    steady = result["steady_state"]  # epoch 2 of a 2-epoch training, beside the fresh start
    assert steady["epoch"] == 2 and steady["repeats"] == 1
    assert steady["engine_img_per_s"] == steady["raw"]["engine_img_per_s"][0] > 0
    assert steady["speedup"] == steady["engine_img_per_s"] / steady["reference_img_per_s"]
    assert steady["engine_vs_fresh"] == steady["engine_img_per_s"] / result["engine_img_per_s"]
    assert steady["reference_vs_fresh"] == steady["reference_img_per_s"] / result["reference_img_per_s"]


def test_too_many_steps_for_one_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "dataset_spec", lambda steps: {"name": "shapes", "image_size": 28, "n_train": 300})
    with pytest.raises(VaeflowError, match="full batches"):
        bench.bench_train(out=tmp_path / "x.json", repeats=1, steps=3, threads=1)
    assert not (tmp_path / "x.json").exists()


def test_flop_counter_on_another_mlp():
    """6 x multiply-adds, by hand, for a 2-hidden-layer MLP VAE on 16x16 shapes with 5 latents."""
    raw = {
        "data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 8, "n_test": 8}},
        "model": {"latent_dim": 5, "encoder": {"name": "mlp", "hidden": [64, 32]},
                  "decoder": {"name": "mlp", "hidden": [32]}, "likelihood": {"name": "bernoulli"}},
    }
    model = build_model(validate(raw))
    encoder = 256 * 64 + 64 * 32 + 32 * 10  # 256 pixels -> 64 -> 32 -> 2 x 5
    decoder = 5 * 32 + 32 * 256
    assert bench.linear_macs(model) == encoder + decoder == 27_104
    assert bench.training_flops_per_image(model) == 6 * 27_104


def test_flop_counter_ignores_non_linear_layers():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(10, 7), nn.ReLU(), nn.Sequential(nn.Linear(7, 3)))
    assert bench.training_flops_per_image(net) == 6 * (10 * 7 + 7 * 3)


def test_reference_model_matches_the_engine_shape():
    assert bench.training_flops_per_image(bench.ReferenceVAE()) == 3_907_200
    x = torch.rand(3, 1, 28, 28)  # (B, 1, 28, 28)
    recon, mu, logvar = bench.ReferenceVAE()(x)
    assert recon.shape == (3, 784) and mu.shape == logvar.shape == (3, 20)
    assert torch.isfinite(bench.reference_loss(recon, x, mu, logvar))


def test_pipeline_bench_reports_consistent_ratios(tmp_path):
    """`vaeflow bench pipeline` on the tiny config: the JSON matches its own raw values (no speed asserted)."""
    import statistics

    from vaeflow.pipelines.bench import bench_pipeline

    from conftest import TINY

    out = tmp_path / "pipeline.json"
    result = bench_pipeline(out=out, config=TINY, epochs=1, repeats=1)
    assert json.loads(out.read_text()) == result
    raw = result["raw"]
    assert result["bare_train_s"] == statistics.median(raw["bare"])
    assert result["pipeline_train_s"] == statistics.median(raw["temporary_server"])
    assert result["overhead_ratio"] == pytest.approx(result["pipeline_train_s"] / result["bare_train_s"])
    assert result["overhead_ratio_running_server"] == pytest.approx(
        statistics.median(raw["running_server"]) / result["bare_train_s"])
    assert 0 < result["cached_rerun_s"] < result["pipeline_train_s"] + result["bare_train_s"]
    assert all(0.1 < v < 64 for v in result["peak_rss_gib"].values())  # GiB, measured per command


def test_contention_totals_count_only_the_time_both_jobs_ran():
    """Two jobs' images/s over the window both trained, by hand: job a runs 0-10 s (1000 steps, evenly), job b starts
    at 2 s, settles its thread count until 2.5 s and ends at 6 s (350 steps); in 2.5-6 s a does 350 steps and b 350,
    at 128 images per step."""
    from vaeflow.pipelines.bench_contention import overlap_img_per_s, steps_at

    a = {"start": 0.0, "settle": 0.0, "end": 10.0, "steps": 1000, "images": 128_000,
         "timeline": [[0.0, 0], [5.0, 500], [10.0, 1000]]}
    b = {"start": 2.0, "settle": 0.5, "end": 6.0, "steps": 350, "images": 44_800,
         "timeline": [[2.0, 0], [2.5, 0], [4.25, 175], [6.0, 350]]}
    assert steps_at(a["timeline"], 2.5) == pytest.approx(250) and steps_at(a["timeline"], 6.0) == pytest.approx(600)
    assert steps_at(b["timeline"], 0.0) == 0 and steps_at(b["timeline"], 9.0) == 350
    total, span = overlap_img_per_s([a, b])
    assert span == pytest.approx(3.5)
    assert total == pytest.approx((350 + 350) * 128 / 3.5)  # not (1000 + 350) * 128 / 10
    alone, span = overlap_img_per_s([b])  # one job: from its settled start to its end
    assert span == pytest.approx(3.5) and alone == pytest.approx(350 * 128 / 3.5)
