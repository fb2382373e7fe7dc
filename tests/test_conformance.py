"""The plugin conformance kit (vaeflow.core.testing): every registered plugin passes it, and broken toy plugins fail it with
a message that names the plugin and the check."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field
from torch import nn

from vaeflow.core import testing
from vaeflow.core.config import apply_sets, load_config
from vaeflow.core.interfaces import (
    FEATURE_MAP, Dataset, Encoder, GridDecoder, Likelihood, Metric, Noise, Options, Prior, QuantizerOutput, Renderer,
    Stage, form_of,
)
from vaeflow.core.registry import discover, get_registry
from vaeflow.plugins.datasets import IDX_FILES
from vaeflow.plugins.encoders import MLPEncoder
from vaeflow.plugins.latent_priors import StandardNormal
from vaeflow.plugins.likelihoods import Gaussian
from vaeflow.plugins.models import VAE
from vaeflow.plugins.quantizers import VQ

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vae-shapes-tiny.yaml"
VQ_TINY = ROOT / "configs" / "vqvae2-shapes-tiny.yaml"
REGISTRY = get_registry()  # at collection: the plugins to parametrize over
SMALL_PRIOR = {"channels": 16, "layers": 2, "kernel_size": 3}


def names(family: str) -> list[str]:
    """Every registered plugin of a family."""
    return REGISTRY.names(family)


def all_plugins() -> list[tuple[str, str]]:
    """(family, name) of every registered plugin."""
    return [(family, name) for family in REGISTRY.entries for name in names(family)]


def plugin_class(family: str, name: str) -> type:
    """The registered class of a plugin, from the registry of this session."""
    return get_registry().get(family, name).cls


# --- every registered plugin conforms ---------------------------------------------------------
@pytest.mark.parametrize("family, name", all_plugins(), ids=[f"{f}-{n}" for f, n in all_plugins()])
def test_options_conform(family, name):
    testing.check_options(plugin_class(family, name))


@pytest.mark.parametrize("name", names("encoder"))
def test_encoder_conforms(name):
    if form_of(plugin_class("encoder", name)) == FEATURE_MAP:
        testing.check_plugin("encoder", name, shape=(1, 32, 32), stride=4)
    else:
        testing.check_plugin("encoder", name, shape=(1, 28, 28))


@pytest.mark.parametrize("name", names("decoder"))
def test_decoder_conforms(name):
    if form_of(plugin_class("decoder", name)) == FEATURE_MAP:
        testing.check_plugin("decoder", name, out_shape=(1, 32, 32), stride=4, in_channels=8)
    else:
        testing.check_plugin("decoder", name, out_shape=(1, 28, 28), latent_dim=4)


@pytest.mark.parametrize("name", names("likelihood"))
def test_likelihood_conforms(name):
    testing.check_plugin("likelihood", name)


def test_per_pixel_sigma_likelihood_conforms():
    testing.check_plugin("likelihood", "gaussian-learned", options={"sigma": "per-pixel"}, shape=(3, 8, 8))


@pytest.mark.parametrize("name", names("quantizer"))
def test_quantizer_conforms(name):
    testing.check_plugin("quantizer", name)


@pytest.mark.parametrize("name", names("quantizer"))
def test_small_cosine_quantizer_conforms(name):
    if not {"codebook_size", "distance"} <= set(REGISTRY.get("quantizer", name).cls.Options.model_fields):
        pytest.skip(f"the {name} quantizer has no codebook_size/distance options (fsq's codebook is its levels)")
    testing.check_plugin("quantizer", name, options={"codebook_size": 16, "distance": "cosine"})


def prior_options(name: str) -> dict | None:
    """Small options for the built-in gated PixelCNN; a third-party prior runs with its defaults."""
    return SMALL_PRIOR if name == "gated-pixelcnn" else None


@pytest.mark.parametrize("name", names("prior"))
def test_code_prior_conforms(name):
    testing.check_plugin("prior", name, options=prior_options(name), codebook_size=8, grid=(4, 4))


@pytest.mark.parametrize("name", names("prior"))
def test_conditional_code_prior_conforms(name):
    testing.check_plugin("prior", name, options=prior_options(name), codebook_size=8, grid=(4, 4),
                         condition=(8, (2, 2)))


@pytest.mark.parametrize("condition", [None, (4, (1, 1))], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("name", names("prior"))
def test_code_prior_sums_to_one_over_every_grid(name, condition):
    """3 codes on a 2x2 grid: the kit enumerates all 81 grids and checks that their probabilities sum to 1."""
    testing.check_plugin("prior", name, options=prior_options(name), codebook_size=3, grid=(2, 2), condition=condition)


@pytest.mark.parametrize("name", names("latent_prior"))
def test_latent_prior_conforms(name):
    testing.check_plugin("latent_prior", name)


SCHEDULE_OPTIONS = {"linear": {"warmup_steps": 100}, "cyclical": {"cycle_steps": 100}, "capacity": {"capacity_steps": 100}}


@pytest.mark.parametrize("name", names("schedule"))
def test_schedule_conforms(name):
    testing.check_plugin("schedule", name, options=SCHEDULE_OPTIONS.get(name))


def test_the_schedule_check_catches_a_constant_schedule_that_is_not():
    from vaeflow.core.interfaces import Options as BaseOptions, Schedule

    class Drifting(Schedule):
        name = "drifting"
        constant = True

        class Options(BaseOptions):
            pass

        def beta(self, step):
            return 1.0 + step

    with pytest.raises(AssertionError, match=r"constant check: the class says constant = True"):
        testing.check_schedule(Drifting)


@pytest.mark.parametrize("name", names("noise"))
def test_noise_conforms(name):
    testing.check_plugin("noise", name)


def idx_files_present(cls) -> bool:
    """Whether the four IDX files are in one of the folders an IDX dataset searches (no download)."""
    wanted = [n for pair in IDX_FILES.values() for n in pair]
    return any(all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in wanted)
               for folder in cls(cls.Options()).search_folders())


@pytest.mark.parametrize("name", names("dataset"))
def test_dataset_conforms(name, tmp_path):
    cls = plugin_class("dataset", name)
    options = None
    if name == "shapes":
        options = {"image_size": 16, "n_train": 32, "n_test": 16}
    elif name == "image-folder":
        from PIL import Image

        for i in range(6):  # a tiny folder of PNGs, different sizes and colours
            pixels = np.full((10 + i, 12, 3), 40 * i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
        options = {"root": str(tmp_path), "image_size": 8, "channels": 1}
    elif name in ("fashion-mnist", "mnist") and not idx_files_present(cls):
        pytest.skip(f"the {name} IDX files are not on this machine (no download in tests)")
    testing.check_plugin("dataset", name, options=options)


def model_config(kind: str):
    """A tiny config of each built-in kind: vae-shapes-tiny for the continuous ones, vqvae2-shapes-tiny for VQ."""
    if kind in ("vae", "ae"):
        return apply_sets(load_config(TINY), [f"model.kind={kind}"])
    if kind == "dae":
        return apply_sets(load_config(TINY), ["model.kind=dae", "model.noise={name: gaussian}"])
    if kind == "vqvae2":
        return load_config(VQ_TINY)
    if kind == "vqvae":
        return apply_sets(load_config(VQ_TINY), ["model.kind=vqvae", "model.vq.strides=[4]", "prior.bottom=null"])
    shipped = ROOT / "configs" / f"{kind}-shapes-tiny.yaml"  # the zoo's kinds ship their own tiny config
    return load_config(shipped) if shipped.exists() else None


@pytest.mark.parametrize("kind", names("model"))
def test_model_conforms(kind):
    config = model_config(kind)
    if config is None:
        pytest.skip(f"no tiny config for the third-party model kind {kind!r}")
    testing.check_plugin("model", kind, config=config, steps=2)


def test_check_model_takes_a_path_or_a_raw_dict():
    testing.check_model(TINY, steps=1)
    testing.check_model({"data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 32, "n_test": 8}},
                         "model": {"kind": "ae", "latent_dim": 2, "encoder": {"name": "mlp", "hidden": [16]},
                                   "decoder": {"name": "mlp", "hidden": [16]}, "likelihood": {"name": "bernoulli"}}},
                        steps=1)


@pytest.mark.parametrize("name", names("renderer"))
def test_renderer_conforms(name):
    testing.check_plugin("renderer", name)


def test_renderer_check_takes_a_given_model():
    from vaeflow.core.data import load_split
    from vaeflow.core.model import build_model

    cfg = load_config(TINY)
    model = build_model(cfg)
    testing.check_renderer(plugin_class("renderer", "interpolation"), model=model, images=load_split(cfg, "test")[:16])


@pytest.mark.parametrize("name", names("metric"))
def test_metric_conforms(name):
    testing.check_plugin("metric", name)


def test_metric_check_takes_a_given_model():
    from vaeflow.core.data import load_split
    from vaeflow.core.model import build_model

    cfg = apply_sets(load_config(TINY), ["model.kind=ae"])
    model = build_model(cfg)
    testing.check_metric(plugin_class("metric", "latent"), model=model, images=load_split(cfg, "test")[:8],
                         config={"batch_size": 3})
    with pytest.raises(ValueError, match="do not meet"):
        testing.check_metric(plugin_class("metric", "codebook"), model=model, images=load_split(cfg, "test")[:8])


def stage_configs(name: str) -> list:
    """The tiny configs of the built-in model kinds that add the stage."""
    kinds = [kind for kind in names("model") if name in plugin_class("model", kind).stages]
    return [c for c in map(model_config, kinds) if c is not None]


@pytest.mark.parametrize("name", names("stage"))
def test_stage_conforms(name):
    configs = stage_configs(name)
    if not configs:
        pytest.skip(f"no tiny config of a model kind that adds the third-party stage {name!r}")
    for config in configs:  # static: declarations, expansion, key
        testing.check_plugin("stage", name, config=config)


def test_the_vq_stages_run_through_the_stage_check(tmp_path):
    """extract_codes, then train_prior (one per level) on its result, then sample: each checked with the real
    results of the stages before it (a tiny VQ-VAE-2, 2 training steps)."""
    from vaeflow.core.checkpoint import WEIGHTS_FILE
    from vaeflow.core.engine import Trainer
    from vaeflow.core.interfaces import file_sha256
    from vaeflow.core.manifest import MANIFEST_FILE, load_prepared, prepare

    cfg = apply_sets(load_config(VQ_TINY), ["train.max_steps=2", "train.progress=false", "data.dataset.n_train=128",
                                            "data.dataset.n_test=16", "prior.batch_size=32", "prior.sample.n=2"])
    manifest, data_dir = prepare(cfg, tmp_path / "data")
    Trainer(cfg, tmp_path / "train", train_images=load_prepared(data_dir)["train"]).fit()
    weights = file_sha256(tmp_path / "train" / WEIGHTS_FILE)
    inputs = {"prepare_data": {"folder": str(data_dir), "manifest_hash": manifest["manifest_hash"],
                               "sha256": manifest["manifest_hash"], "files": [str(data_dir / MANIFEST_FILE)]},
              "train": {"run_dir": str(tmp_path / "train"), "weights_sha256": weights, "sha256": weights,
                        "files": [str(tmp_path / "train" / WEIGHTS_FILE)], "run_id": "kit"}}
    testing.check_plugin("stage", "extract_codes", config=cfg, inputs=inputs)
    codes = plugin_class("stage", "extract_codes")().run(testing.stage_context(cfg, tmp_path / "codes"), inputs)
    testing.check_plugin("stage", "train_prior", config=cfg, inputs={"extract_codes": codes})
    priors = {s.param: s.run(testing.stage_context(cfg, tmp_path / s.id), {"extract_codes": codes})
              for s in plugin_class("stage", "train_prior").expand(cfg)}
    testing.check_plugin("stage", "sample", config=cfg, inputs={"train": inputs["train"], "train_prior": priors})


def test_check_stage_needs_the_inputs_the_stage_reads():
    with pytest.raises(ValueError, match=r"inputs lacks \['train'\]"):
        testing.check_plugin("stage", "sample", config=VQ_TINY, inputs={"train_prior": {}})


def test_the_kit_leaves_the_global_rng_and_threads_alone():
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    testing.check_plugin("latent_prior", "standard-normal")
    testing.check_plugin("noise", "gaussian")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads


def test_check_plugin_names_unknown_plugins_and_needs_a_model_config():
    with pytest.raises(AssertionError, match="encoder 'no-such-encoder' is not registered.*known encoders: conv"):
        testing.check_plugin("encoder", "no-such-encoder")
    with pytest.raises(TypeError, match="needs config="):
        testing.check_plugin("model", "vae")
    with pytest.raises(ValueError, match="of kind 'vae'"):
        testing.check_plugin("model", "ae", config=load_config(TINY))


def test_required_options_must_be_passed():
    with pytest.raises(TypeError, match=r"required options \['root'\]; pass options="):
        testing.check_dataset(plugin_class("dataset", "image-folder"))


# --- broken toy plugins: the kit must fail them, naming the plugin and the check --------------
class LaxOptionsEncoder(MLPEncoder):
    """Options on a bare pydantic BaseModel: unknown keys are silently ignored."""

    name = "lax-options"

    class Options(BaseModel):
        hidden: list[int] = Field([16], description="hidden widths")
        activation: str = Field("relu", description="nonlinearity")


class UndescribedOptionsEncoder(MLPEncoder):
    """An option without a description."""

    name = "undescribed"

    class Options(Options):
        hidden: list[int] = [16]
        activation: str = Field("relu", description="nonlinearity")


class WrongShapeEncoder(Encoder):
    """Returns one feature too many."""

    name = "wrong-shape"

    class Options(Options):
        pass

    def __init__(self, options, in_shape, out_features):
        super().__init__(options, in_shape, out_features)
        self.net = nn.Linear(math.prod(in_shape), out_features + 1)

    def forward(self, x):
        return self.net(x.flatten(1))  # (B, out_features + 1)


class NumpyInitEncoder(MLPEncoder):
    """Initial weights from numpy's global RNG, which torch.manual_seed does not seed."""

    name = "numpy-init"

    def __init__(self, options, in_shape, out_features):
        super().__init__(options, in_shape, out_features)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.from_numpy(np.random.randn(*p.shape)))


class UnsavedScaleEncoder(MLPEncoder):
    """A random output scale kept as a plain attribute: not in the state dict, so loading weights misses it."""

    name = "unsaved-scale"

    def __init__(self, options, in_shape, out_features):
        super().__init__(options, in_shape, out_features)
        self.scale = torch.rand(out_features) + 0.5  # (out_features,), should be a registered buffer

    def forward(self, x):
        return super().forward(x) * self.scale  # (B, out_features)


class HalfStrideDecoder(GridDecoder):
    """Upsamples by 2 whatever the stride it was asked for."""

    name = "half-stride"

    class Options(Options):
        pass

    def __init__(self, options, in_channels, out_shape, stride):
        super().__init__(options, in_channels, out_shape, stride)
        self.net = nn.ConvTranspose2d(in_channels, out_shape[0], 2, stride=2)

    def forward(self, h):
        return self.net(h)  # (B, P, 2h, 2w)


class NormLikelihood(Likelihood):
    """log p = -||x - mu||: independent per example, but not a sum of per-pixel terms."""

    name = "l2-norm"

    class Options(Options):
        pass

    def log_prob(self, x, params):
        return -(x - params).flatten(1).norm(dim=1)  # (B,)

    def mean(self, params):
        return params

    def sample(self, params, generator=None):
        return params + torch.randn(params.shape, generator=generator)


class BatchNormalisedLikelihood(Gaussian):
    """Subtracts the batch mean of log p: each example's value depends on the rest of the batch."""

    name = "batch-normalised"

    def log_prob(self, x, params):
        lp = super().log_prob(x, params)  # (B,)
        return lp - lp.mean()


class DetachedQuantizer(VQ):
    """Returns the code vectors detached: no straight-through gradient reaches the encoder."""

    name = "detached"

    def forward(self, z_e):
        out = super().forward(z_e)
        return QuantizerOutput(out.quantized.detach(), out.indices, out.losses, out.stats)


class LeakyPrior(Prior):
    """A centred 3x3 convolution over the code embeddings: the logits see the current and the next codes."""

    name = "leaky"

    class Options(Options):
        pass

    def __init__(self, options, codebook_size, grid, condition=None):
        super().__init__(options, codebook_size, grid, condition)
        self.embedding = nn.Embedding(codebook_size, 8)
        self.conv = nn.Conv2d(8, codebook_size, 3, padding=1)

    def forward(self, codes, condition=None):
        return self.conv(self.embedding(codes).permute(0, 3, 1, 2))  # (B, K, h, w)


class OffsetKLPrior(StandardNormal):
    """Closed-form KL off by 0.1 nat (and kl_per_dim off to match, so only the Monte Carlo check can see it)."""

    name = "offset-kl"

    def kl(self, posterior, z):
        return super().kl(posterior, z) + 0.1

    def kl_per_dim(self, posterior):
        per_dim = super().kl_per_dim(posterior)  # (B, J)
        return None if per_dim is None else per_dim + 0.1 / self.latent_dim


class DoubledPerDimPrior(StandardNormal):
    """kl_per_dim twice the KL that kl() reports."""

    name = "doubled-per-dim"

    def kl_per_dim(self, posterior):
        per_dim = super().kl_per_dim(posterior)  # (B, J)
        return None if per_dim is None else 2 * per_dim


class InPlaceNoise(Noise):
    """Adds its noise to the caller's tensor."""

    name = "in-place"

    class Options(Options):
        std: float = Field(0.1, description="noise standard deviation")

    def __call__(self, x):
        return x.add_(self.options.std * torch.randn_like(x))


class MisdeclaredDataset(Dataset):
    """Declares 8x8 images but holds 8x9 ones."""

    name = "misdeclared"

    class Options(Options):
        pass

    @property
    def shape(self):
        return (1, 8, 8)

    def tensors(self, split):
        return torch.zeros(4, 1, 8, 9, dtype=torch.uint8)  # (N, C, H, W + 1)


class GhostRenderer(Renderer):
    """Claims a file it never wrote."""

    name = "ghost"
    kinds = ("continuous",)

    class Options(Options):
        pass

    def render(self, ctx):
        return [Path(ctx.out_dir) / "never-written.png"]


class UnseededMetric(Metric):
    """A headline number drawn from numpy's global RNG, which evaluate's torch.manual_seed(eval.seed) does not seed."""

    name = "unseeded"
    needs = ("continuous",)
    headline = ("noise_level",)

    class Options(Options):
        pass

    def compute(self, ctx):
        return {"noise_level": float(np.random.rand())}


class MisspelledNeedsMetric(UnseededMetric):
    """Needs a capability that does not exist: it would silently never run."""

    name = "misspelled-needs"
    needs = ("continous",)


class TensorMetric(UnseededMetric):
    """Returns a tensor, which eval.json cannot hold."""

    name = "tensor-valued"

    def compute(self, ctx):
        return {"noise_level": ctx.images.mean()}


class MisnamedSectionStage(Stage):
    """Declares a config section that does not exist: its key would silently cover nothing."""

    name = "misnamed-section"
    sections = ("evaluation",)

    def run(self, ctx, inputs):
        return {"files": []}


class BareStringInputsStage(MisnamedSectionStage):
    """inputs = ("train") is the string "train", not a tuple."""

    name = "bare-string-inputs"
    sections = ()
    inputs = ("train")


class PathKeyStage(MisnamedSectionStage):
    """Puts a Path into its key, which canonical_json cannot hash."""

    name = "path-key"
    sections = ("eval",)

    def key_parts(self, cfg, inputs):
        return [Path("weights.safetensors")]


class ClockKeyStage(PathKeyStage):
    """Puts the time into its key: a new key on every run, so it never hits the cache."""

    name = "clock-key"

    def key_parts(self, cfg, inputs):
        return [time.perf_counter_ns()]


class TwinStage(PathKeyStage):
    """Expands into two instances with one id."""

    name = "twin"

    @classmethod
    def expand(cls, cfg):
        return [cls("a"), cls("a")]

    def key_parts(self, cfg, inputs):
        return []


class GhostFileStage(TwinStage):
    """Lists a file it never wrote."""

    name = "ghost-file"

    @classmethod
    def expand(cls, cfg):
        return [cls()]

    def run(self, ctx, inputs):
        return {"sha256": None, "files": [str(ctx.folder / "never-written.json")]}


class PathResultStage(GhostFileStage):
    """Returns a Path in its result, which the pipeline cannot store as JSON."""

    name = "path-result"

    def run(self, ctx, inputs):
        ctx.folder.mkdir(parents=True)
        return {"folder": ctx.folder, "files": []}


BROKEN = [  # (check, toy, kwargs, what the message must say besides the plugin's name)
    (testing.check_options, LaxOptionsEncoder, {}, r"options check: the unknown key 'conformance_unknown_key' was "
                                                   r"accepted.*extra='forbid'"),
    (testing.check_encoder, UndescribedOptionsEncoder, {}, r"options check: field 'hidden' has no description"),
    (testing.check_encoder, WrongShapeEncoder, {}, r"output shape check: .* has shape \(3, 7\), expected \(3, 6\)"),
    (testing.check_encoder, NumpyInitEncoder, {}, r"determinism check: state_dict\['net.0.weight'\].*differs.*"
                                                  r"torch.manual_seed\(0\).*not numpy"),
    (testing.check_encoder, UnsavedScaleEncoder, {}, r"state-dict round trip check: encoder output .*differs.*"
                                                     r"register_buffer"),
    (testing.check_decoder, HalfStrideDecoder, {}, r"output shape check: .* has shape \(3, 1, 16, 16\), "
                                                   r"expected \(3, 1, 32, 32\)"),
    (testing.check_likelihood, NormLikelihood, {}, r"per-pixel sum check: .*sum over pixels of a per-pixel term"),
    (testing.check_likelihood, BatchNormalisedLikelihood, {},
     r"batch independence check: log_prob of each example computed alone \(got\) and in the batch"),
    (testing.check_quantizer, DetachedQuantizer, {"options": {"codebook_size": 16}},
     r"straight-through gradient check: quantized does not require grad"),
    (testing.check_code_prior, LeakyPrior, {}, r"causality check: changing the code at raster position 0 \(row 0, "
                                               r"column 0\) changed the logits at position 0"),
    (testing.check_latent_prior, OffsetKLPrior, {}, r"Monte Carlo KL check: for example 0, kl\(q, z\) averages .* "
                                                    r"\(gap 0\.1\d* > 5 standard errors"),
    (testing.check_latent_prior, DoubledPerDimPrior, {}, r"kl_per_dim check: kl_per_dim\(q\).sum\(1\) should match"),
    (testing.check_noise, InPlaceNoise, {}, r"input untouched check: noise\(x\) modified x in place"),
    (testing.check_dataset, MisdeclaredDataset, {}, r"split 'train' check: tensors\('train'\) has shape "
                                                    r"\(4, 1, 8, 9\), expected \(N, \*shape\)"),
    (testing.check_renderer, GhostRenderer, {}, r"render \(continuous model\) check: render returned .*"
                                                r"never-written.png, which does not exist"),
    (testing.check_metric, UnseededMetric, {}, r"determinism check: two calls of compute\(ctx\) after "
                                               r"torch.manual_seed\(0\) differ under keys \['noise_level'\].*not numpy"),
    (testing.check_metric, MisspelledNeedsMetric, {}, r"needs check: needs names \['continous'\], which are not "
                                                      r"Capabilities fields"),
    (testing.check_metric, TensorMetric, {}, r"compute \(tiny continuous model\) check: out\['noise_level'\] = "
                                             r"tensor\(.*cannot be written to eval.json"),
    (testing.check_stage, MisnamedSectionStage, {}, r"config sections check: sections names \['evaluation'\], which "
                                                    r"are not config sections"),
    (testing.check_stage, BareStringInputsStage, {}, r"inputs check: inputs is 'train', expected a tuple of non-empty "
                                                     r"str.*\('x',\)"),
    (testing.check_stage, PathKeyStage, {}, r"key_parts check: key_parts\(cfg, inputs\) of path-key returned "
                                            r"\[PosixPath\('weights.safetensors'\)\], which vaeflow.core.config.canonical_json "
                                            r"cannot hash"),
    (testing.check_stage, ClockKeyStage, {}, r"key_parts check: key_parts\(cfg, inputs\) of clock-key is not "
                                             r"deterministic"),
    (testing.check_stage, TwinStage, {}, r"expand check: expand\(cfg\) gave the ids \['twin_a', 'twin_a'\], which "
                                         r"repeat"),
    (testing.check_stage, GhostFileStage, {"inputs": {}}, r"run \(ghost-file\) check: result\['files'\] lists "
                                                          r".*never-written.json, which does not exist"),
    (testing.check_stage, PathResultStage, {"inputs": {}}, r"run \(path-result\) check: run\(ctx, inputs\) returned "
                                                           r".*which is not a JSON object"),
]


@pytest.mark.parametrize("check, toy, kwargs, message", BROKEN, ids=[toy.name for _, toy, _, _ in BROKEN])
def test_the_kit_fails_a_broken_plugin_with_a_helpful_message(check, toy, kwargs, message):
    with pytest.raises(AssertionError, match=message) as info:
        check(toy, **kwargs)
    text = str(info.value)
    assert f"{toy.FAMILY} {toy.name!r} ({toy.__module__}.{toy.__qualname__}) failed the" in text, text


class NaNVAE(VAE):
    """A VAE whose reconstruction term is NaN."""

    name = "nan-vae"

    def forward(self, x):
        out = super().forward(x)
        out.terms["reconstruction"] = out.terms["reconstruction"] * float("nan")
        return out


def test_the_kit_fails_a_model_whose_objective_is_nan(monkeypatch):
    registry = discover()
    registry.add("model", NaNVAE, None, "tests/test_conformance.py", "tests")
    monkeypatch.setattr("vaeflow.core.registry._REGISTRY", registry)  # build_model and the config see the toy kind
    config = apply_sets(load_config(TINY), ["model.kind=nan-vae"])
    with pytest.raises(AssertionError, match=r"model 'nan-vae' \(.*NaNVAE\) failed the objective check: "
                                             r"terms\['reconstruction'\] has 1 non-finite value\(s\)"):
        testing.check_plugin("model", "nan-vae", config=config)
