"""examples/families/: one short plugin module per component family. Each is loaded the way a user loads it
(VAEFLOW_PLUGINS, the folder on sys.path) and run through its family's conformance check (vaeflow.core.testing); the metric
runs inside vaeflow.core.metrics.evaluate, the stage on a tiny trained model. The docs pages include each file itself
(tests/test_docs.py checks that)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from vaeflow.core import testing
from vaeflow.core.config import EvalConfig, validate
from vaeflow.core.registry import get_registry

from conftest import ROOT

EXAMPLES = ROOT / "examples" / "families"
STAGE_TINY = {**testing.TINY_MODELS["continuous"],
              "model": {**testing.TINY_MODELS["continuous"]["model"], "kind": "vae-stats"},
              "train": {"epochs": 2, "batch_size": 16, "progress": False, "device": "cpu", "compile": False}}

# (module, family, registered name, keyword arguments of vaeflow.core.testing.check_plugin)
CASES = [
    ("decoder_example", "decoder", "spatial-broadcast", {"out_shape": (3, 16, 12)}),
    ("likelihood_example", "likelihood", "laplace", {"shape": (3, 8, 8)}),
    ("quantizer_example", "quantizer", "minimal-vq", {"options": {"codebook_size": 16}}),
    ("prior_example", "prior", "positional-categorical", {"codebook_size": 3, "grid": (2, 2)}),  # enumerable: sums to 1
    ("prior_example", "prior", "positional-categorical", {"condition": (8, (2, 2))}),  # a condition is ignored
    ("latent_prior_example", "latent_prior", "learned-gaussian", {}),
    ("dataset_example", "dataset", "bars", {"options": {"size": 6, "n_train": 32, "n_test": 8}}),
    ("renderer_example", "renderer", "error-map", {}),  # on the kit's tiny continuous and discrete models
    ("metric_example", "metric", "latent-kurtosis", {}),
    ("stage_example", "stage", "posterior_stats", {"config": STAGE_TINY}),  # static: its run is tested below
]


@pytest.fixture
def load_examples(local_plugins):
    """Load modules of examples/families (copied verbatim) through VAEFLOW_PLUGINS -> the fresh Registry."""

    def load(*modules: str):
        registry = local_plugins({m: (EXAMPLES / f"{m}.py").read_text() for m in modules})
        assert not registry.failures, registry.failures
        return registry

    return load


def test_every_example_file_has_a_conformance_case():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted({module for module, *_ in CASES})


@pytest.mark.parametrize("module, family, name, kwargs", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_the_example_conforms(load_examples, module, family, name, kwargs):
    registry = load_examples(module)
    assert registry.get(family, name).source == f"VAEFLOW_PLUGINS:{module}"  # registered through its hook
    testing.check_plugin(family, name, **kwargs)


BROKEN_PRIOR = ("return self.logits.expand(len(codes), -1, -1, -1)",
                "return self.logits.expand(len(codes), -1, -1, -1) + codes[:, None].float()")


def test_the_checks_fail_a_broken_copy_of_an_example(local_plugins):
    """The prior example with logits that see the codes themselves: its check must fail on causality."""
    source = (EXAMPLES / "prior_example.py").read_text()
    assert BROKEN_PRIOR[0] in source
    local_plugins({"broken_prior_example": source.replace(*BROKEN_PRIOR)})
    with pytest.raises(AssertionError, match=r"prior 'positional-categorical' .* failed the causality check"):
        testing.check_plugin("prior", "positional-categorical")


def test_the_examples_train_together_in_models(load_examples):
    """A VAE on bars with the spatial-broadcast decoder, the Laplace likelihood and the learned Gaussian prior; a
    VQ-VAE with the minimal quantizer and the per-position code prior: check_model builds, samples and trains both."""
    load_examples("dataset_example", "decoder_example", "likelihood_example", "latent_prior_example",
                  "quantizer_example", "prior_example")
    bars = {"dataset": {"name": "bars", "size": 16, "n_train": 64, "n_test": 16}}
    testing.check_model({"data": bars, "model": {
        "kind": "vae", "latent_dim": 3, "encoder": {"name": "mlp", "hidden": [32]},
        "decoder": {"name": "spatial-broadcast", "channels": 8}, "likelihood": {"name": "laplace"},
        "prior": {"name": "learned-gaussian"}}}, steps=2)
    testing.check_model({"data": bars, "model": {
        "kind": "vqvae", "encoder": {"name": "vqvae-conv", "residual_blocks": 1, "residual_channels": 8},
        "decoder": {"name": "vqvae-conv", "channels": 16, "residual_blocks": 1, "residual_channels": 8},
        "likelihood": {"name": "bernoulli"}, "quantizer": {"name": "minimal-vq", "codebook_size": 8},
        "vq": {"embedding_dim": 4, "hidden_channels": 16, "strides": [4]}},
        "prior": {"top": {"name": "positional-categorical"}}}, steps=2)


def test_the_metric_example_runs_in_evaluate_for_models_with_latent_vectors_only(load_examples):
    from vaeflow.core.data import load_split
    from vaeflow.core.metrics import evaluate
    from vaeflow.core.model import build_model

    load_examples("metric_example")
    eval_cfg = EvalConfig(batch_size=16, iwae_k=2)
    cfg = validate(testing.TINY_MODELS["continuous"])
    torch.manual_seed(0)
    model, images = build_model(cfg).eval(), load_split(cfg, "test")
    out = evaluate(model, images, eval_cfg)
    assert "neg_elbo_nats" in out  # the built-in metrics still run beside it
    with torch.no_grad():
        means = model.posterior(images).mode().double().numpy()  # (N, J)
    want = scipy.stats.kurtosis(means, axis=0, fisher=True, bias=True)  # excess kurtosis per unit, (J,)
    np.testing.assert_allclose(out["latent_kurtosis"], want, rtol=1e-5)
    assert out["latent_kurtosis_mean"] == pytest.approx(want.mean(), rel=1e-5)

    vq_cfg = validate(testing.TINY_MODELS["discrete"])  # code grids, no latent vector: the metric does not apply
    out = evaluate(build_model(vq_cfg), load_split(vq_cfg, "test"), eval_cfg)
    assert "top_usage" in out and not [k for k in out if k.startswith("latent_kurtosis")]


def test_the_stage_example_runs_after_train_and_writes_the_posterior_mean_statistics(load_examples, tmp_path):
    """prepare_data and train for real (a tiny VAE, 8 steps), the stage through the kit, and its JSON against the
    posterior means computed here from the encoder's output ([mean | log-variance]) and numpy."""
    from vaeflow.core.checkpoint import WEIGHTS_FILE, load_model
    from vaeflow.core.data import load_split
    from vaeflow.core.engine import Trainer
    from vaeflow.core.interfaces import file_sha256
    from vaeflow.core.manifest import MANIFEST_FILE, load_prepared, prepare
    from vaeflow.pipelines.pipeline import stage_graph

    load_examples("stage_example")
    cfg = validate(STAGE_TINY)
    assert [s.id for s in stage_graph(cfg).stages][:3] == ["prepare_data", "train", "posterior_stats"]
    manifest, data_dir = prepare(cfg, tmp_path / "data")
    run_dir = tmp_path / "train"
    Trainer(cfg, run_dir, train_images=load_prepared(data_dir)["train"]).fit()
    weights = file_sha256(run_dir / WEIGHTS_FILE)
    inputs = {"prepare_data": {"folder": str(data_dir), "manifest_hash": manifest["manifest_hash"],
                               "sha256": manifest["manifest_hash"], "files": [str(data_dir / MANIFEST_FILE)]},
              "train": {"run_dir": str(run_dir), "weights_sha256": weights, "sha256": weights,
                        "files": [str(run_dir / WEIGHTS_FILE)], "run_id": "kit"}}
    testing.check_plugin("stage", "posterior_stats", config=cfg, inputs=inputs)

    stage = get_registry().get("stage", "posterior_stats").cls()
    ctx = testing.stage_context(cfg, tmp_path / "stats")
    result = stage.run(ctx, inputs)
    path = Path(result["path"])
    assert result["files"] == [str(path)] and ctx.artifacts == [(path, None)]
    stats = json.loads(path.read_text())
    model, _ = load_model(run_dir)
    with torch.no_grad():
        params = model.encoder(load_split(cfg, "test")).double().numpy()  # (N, 2J): [mean | log-variance]
    means = params[:, : model.latent_dim]  # (N, J)
    np.testing.assert_allclose(stats["mean"], means.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["variance"], means.var(0, ddof=1), rtol=1e-9, atol=1e-12)
    assert np.ptp(stats["variance"]) > 0  # trained units differ: not a vacuous comparison
