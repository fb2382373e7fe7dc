"""VQ-VAE / VQ-VAE-2 models: grids from strides, code round trips, codebook identity, training, exact resume."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch

from vaeflow.core.checkpoint import WEIGHTS_FILE, load_model, read_metrics
from vaeflow.core.config import load_config
from vaeflow.core.engine import Trainer
from vaeflow.core.errors import ConfigError
from vaeflow.core.metrics import evaluate_vq
from vaeflow.core.model import build_model
from vaeflow.core.priors import build_prior, prior_metrics, train_prior
from vaeflow.core.codes import sample_codes, sample_images
from vaeflow.plugins.models import vq_grids

from conftest import ROOT, CrashAt

VQ_TINY = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"
SMALL = ["data.dataset.n_train=256", "data.dataset.n_test=32", "train.progress=false"]


def cfg_with(*sets):
    """The tiny VQ-VAE-2 config with overrides."""
    return load_config(VQ_TINY, list(SMALL) + list(sets))


@pytest.mark.parametrize("size, strides, grids", [
    (32, [4, 2], {"top": (4, 4), "bottom": (8, 8)}),
    (64, [4, 2], {"top": (8, 8), "bottom": (16, 16)}),
    (64, [2, 4], {"top": (8, 8), "bottom": (32, 32)}),
    (32, [8], {"top": (4, 4)}),
])
def test_grids_follow_from_input_size_and_strides(size, strides, grids):
    assert vq_grids((1, size, size), strides) == grids
    kind = "vqvae" if len(strides) == 1 else "vqvae2"
    model = build_model(cfg_with(f"data.dataset.image_size={size}", f"model.kind={kind}", f"model.vq.strides={strides}"))
    assert model.grids == grids
    codes = model.encode_codes(torch.rand(2, 1, size, size))
    assert {k: tuple(v.shape[1:]) for k, v in codes.items()} == grids


def test_strides_that_do_not_divide_the_input_name_the_fix():
    with pytest.raises(ConfigError, match=r"does not divide the 28x28 input; set data.pad_to: 32"):
        vq_grids((1, 28, 28), [4, 2])


def test_codes_round_trip_through_the_codebooks():
    model = build_model(cfg_with()).eval()
    x = torch.rand(5, 1, 32, 32)
    outs = model.quantize(x)
    codes = {level: out.indices for level, out in outs.items()}
    for level, out in outs.items():  # indices -> codebook lookup gives the quantized vectors
        assert torch.allclose(model.quantizers[level].lookup(out.indices), out.quantized, atol=1e-6)
    assert torch.allclose(model.likelihood.mean(model.decode_codes(codes)), model.reconstruct(x), atol=1e-5)


def test_codebook_hash_is_the_codebooks_identity():
    a, b = build_model(cfg_with()), build_model(cfg_with())
    b.load_state_dict(a.state_dict())
    assert a.codebook_hash() == b.codebook_hash()
    b.encoders["top"].net[0].weight.data += 1.0  # not a codebook: same codes space, same hash
    assert a.codebook_hash() == b.codebook_hash()
    q = b.quantizers["bottom"]
    for name, buf in list(q.named_buffers()) + list(q.named_parameters()):
        if buf.dim() == 2 and buf.shape[0] == q.codebook_size:
            buf.data[0] += 0.5
    assert a.codebook_hash() != b.codebook_hash()


def test_engine_trains_a_vqvae2_and_logs_codebook_health(tmp_path):
    cfg = cfg_with("train.epochs=3", "train.log_every=2")
    result = Trainer(cfg, tmp_path).fit()
    records = read_metrics(tmp_path)
    assert len(records) == 3
    for level in ("top", "bottom"):
        for stat in ("perplexity", "usage", "usage_ema", "dead_codes", "commitment"):
            assert f"{level}/{stat}" in records[-1]
        assert 1.0 <= records[-1][f"{level}/perplexity"] <= 16.0
    assert records[-1]["reconstruction"] < records[0]["reconstruction"]  # it learns
    # the loss is the paper's: reconstruction per dimension plus the VQ terms
    last = records[-1]
    vq_terms = sum(v for k, v in last.items() if k.endswith(("/commitment", "/codebook")))
    assert last["loss"] == pytest.approx(last["reconstruction"] / 1024 + vq_terms, rel=1e-4)
    model, _ = load_model(tmp_path)
    metrics = evaluate_vq(model, torch.rand(16, 1, 32, 32), cfg.eval)
    assert 0 < metrics["top_usage"] <= 1 and metrics["top_dead_codes"] == round(16 * (1 - metrics["top_usage"]))


def test_vqvae2_resume_after_crash_is_byte_identical(tmp_path):
    cfg = cfg_with("train.epochs=2", "train.log_every=1", "train.checkpoint_every=3",
                   "model.quantizer.restart_after=2")
    Trainer(cfg, tmp_path / "full").fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(cfg, tmp_path / "crash", callbacks=[CrashAt(5)]).fit()
    Trainer(cfg, tmp_path / "crash", resume=True).fit()
    full = (tmp_path / "full" / WEIGHTS_FILE).read_bytes()
    assert (tmp_path / "crash" / WEIGHTS_FILE).read_bytes() == full


def test_usage_warning_fires_when_a_codebook_collapses(tmp_path, caplog):
    cfg = cfg_with("train.epochs=1", "train.log_every=1", "model.vq.usage_warning=1.0")  # any usage is too low
    with caplog.at_level(logging.WARNING, logger="vaeflow.train"):
        Trainer(cfg, tmp_path).fit()
    messages = [r.getMessage() for r in caplog.records if "codebook usage" in r.getMessage()]
    assert any("top level" in m for m in messages) and any("bottom level" in m for m in messages)
    assert len(messages) == 2  # once per level per epoch, not every step


def test_evaluate_vq_counts_codes_by_hand():
    model = build_model(cfg_with()).eval()
    x = torch.rand(12, 1, 32, 32)
    metrics = evaluate_vq(model, x, cfg_with().eval)
    codes = model.encode_codes(x)
    for level, c in codes.items():
        counts = torch.bincount(c.flatten(), minlength=16).double()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        assert metrics[f"{level}_usage"] == pytest.approx(float((counts > 0).double().mean()))
        assert metrics[f"{level}_perplexity"] == pytest.approx(float(entropy.exp()), rel=1e-9)
    mse = (model.reconstruct(x) - x).pow(2).mean()
    assert metrics["mse"] == pytest.approx(float(mse), rel=1e-5)


LEVELS = {"top": {"grid": [2, 2], "codebook_size": 4}, "bottom": {"grid": [4, 4], "codebook_size": 4}}
SPEC = {"name": "gated-pixelcnn", "channels": 16, "layers": 2, "kernel_size": 3}


def test_ancestral_sampling_is_seeded_and_needs_every_level():
    torch.manual_seed(0)
    priors = {level: build_prior(SPEC, level, LEVELS).eval() for level in ("top", "bottom")}
    model = build_model(cfg_with()).eval()  # a vqvae2: top, then bottom conditioned on the top
    a, b = sample_codes(model, priors, 5, seed=1), sample_codes(model, priors, 5, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["bottom"].shape == (5, 4, 4)
    with pytest.raises(ConfigError, match="missing: bottom"):
        sample_images(model, {"top": priors["top"]}, 2)


def test_train_prior_learns_a_known_code_distribution(tmp_path):
    """Top codes uniform over {0, 1} at the first position and copied elsewhere: 1 bit per grid;
    bottom codes are the top codes upsampled: 0 bits given the top. The trained priors approach both."""
    from vaeflow.core.config import PriorConfig

    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 2, (512, 1, 1), generator=g)
    top = first.expand(512, 2, 2).contiguous()
    bottom = top.repeat_interleave(2, 1).repeat_interleave(2, 2)
    codes = {"train/top": top, "test/top": top[:64], "train/bottom": bottom, "test/bottom": bottom[:64]}
    manifest = {"levels": LEVELS, "stage1": {"weights_sha256": "w" * 64}, "codebook_sha256": "c" * 64}
    pcfg = PriorConfig(epochs=15, batch_size=64, lr=1e-2, log_every=8)
    info_top = train_prior(SPEC, "top", manifest, codes, pcfg, tmp_path / "top", torch.device("cpu"))
    info_bottom = train_prior({**SPEC, "condition_layers": 1}, "bottom", manifest, codes, pcfg, tmp_path / "bottom",
                              torch.device("cpu"))
    assert info_top["test"]["nll_bits_per_code"] == pytest.approx(1 / 4, abs=0.08)  # 1 bit over 4 codes
    assert info_bottom["test"]["nll_bits_per_code"] < 0.05
    assert info_top["lineage"]["codebook_sha256"] == "c" * 64
    saved = json.loads((tmp_path / "top" / "prior.json").read_text())
    assert saved["weights_sha256"] and saved["level"] == "top"
    # the metrics recompute from the saved weights
    prior = build_prior(SPEC, "top", LEVELS)
    prior.load_state_dict(safetensors.torch.load_file(tmp_path / "top" / "prior.safetensors"))
    assert prior_metrics(prior, codes["test/top"], None)["nll_bits_per_code"] == pytest.approx(
        info_top["test"]["nll_bits_per_code"], rel=1e-5)
