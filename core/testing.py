"""A conformance kit for vaeflow plugins: checks a plugin package calls from its own pytest.

    from vaeflow.core import testing
    from my_package import MyEncoder

    def test_my_encoder_conforms():
        testing.check_encoder(MyEncoder)                       # the class itself, default options
        testing.check_plugin("encoder", "my-encoder")          # or: as registered, which also proves it loads

Every check builds the component at small sizes, runs it on real tensors (no mocks) and raises an AssertionError
whose message names the plugin, the check that failed, and what was expected against what came back. Each check
covers, per family: the options model (`check_options`), the shapes the host relies on, determinism under a seed
(two builds after `torch.manual_seed(s)` have identical state dicts and outputs: draw initial weights from torch's
global RNG, never numpy, `random` or the OS), a state-dict round trip (a build under another seed, after
`load_state_dict` of the first one's state, computes the same outputs in eval mode: every tensor that matters must
be a parameter or a registered buffer), and a known answer where the family has one (a likelihood is a sum over
pixels, a code prior is causal and normalised, a latent prior's KL matches its Monte Carlo estimate).

Options default to `cls.Options()`; pass `options=` (an Options instance or a dict) when a field is required.
A model kind needs a config (`check_model(config)`, or `check_plugin("model", kind, config=...)`): a validated
Config, a YAML path or a raw dict, whose dataset the kit shrinks when it is `shapes` (else pass a small one).
A renderer or a metric runs on the kit's tiny built-in models (TINY_MODELS) that it applies to, unless given
`model=` and `images=`. A pipeline stage is checked against a config (`check_stage(cls, config=...)`): its
declarations, expansion and cache key; given `inputs=` (the results of the stages it needs) it also runs, in a
StageContext the kit builds (`stage_context`, which a plugin's own tests can use too).
The checks run on the CPU, on one thread, and leave the caller's global torch RNG state and thread count as they
found them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, NoReturn, get_args

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ValidationError
from torch import nn

from vaeflow.core.checkpoint import WEIGHTS_FILE
from vaeflow.core.codes import sample_images
from vaeflow.core.config import Config, EvalConfig, apply_sets, canonical_json, load_config, validate
from vaeflow.core.data import known_factors, load_split
from vaeflow.core.distributions import DiagonalGaussian
from vaeflow.core.engine import Trainer
from vaeflow.core.errors import ConfigError, PluginError
from vaeflow.core.interfaces import (
    FEATURE_MAP, Capabilities, Component, Dataset, MetricContext, Objective, QuantizerOutput, RenderContext,
    StageContext, form_of,
)
from vaeflow.core.metrics import COMMON_KEYS
from vaeflow.core.model import build_model, data_shape
from vaeflow.core.priors import build_prior
from vaeflow.core.registry import get_registry

SEED = 0  # the default seed of every check; the round trip builds its second instance with SEED + 1
UNKNOWN_KEY = "conformance_unknown_key"  # an option key no plugin has: must be rejected

# A tiny model per latent kind, from vaeflow's own built-in plugins, for renderers that are given no model.
TINY_DATA = {"dataset": {"name": "shapes", "image_size": 32, "n_train": 64, "n_test": 32, "seed": 0}}
TINY_MODELS: dict[str, dict] = {
    "continuous": {
        "data": TINY_DATA,
        "model": {"kind": "vae", "latent_dim": 4, "encoder": {"name": "mlp", "hidden": [64]},
                  "decoder": {"name": "mlp", "hidden": [64]}, "likelihood": {"name": "bernoulli"}},
    },
    "discrete": {
        "data": TINY_DATA,
        "model": {"kind": "vqvae2", "encoder": {"name": "vqvae-conv", "residual_blocks": 1, "residual_channels": 8},
                  "decoder": {"name": "vqvae-conv", "channels": 16, "residual_blocks": 1, "residual_channels": 8},
                  "likelihood": {"name": "gaussian", "sigma": 0.25},
                  "quantizer": {"name": "vq-ema", "codebook_size": 16},
                  "vq": {"embedding_dim": 8, "hidden_channels": 16, "strides": [4, 2]}},
        "prior": {"top": {"name": "gated-pixelcnn", "channels": 8, "layers": 2, "kernel_size": 3},
                  "bottom": {"name": "gated-pixelcnn", "channels": 8, "layers": 2, "kernel_size": 3,
                             "condition_layers": 1}},
    },
}


# --- failure reporting -------------------------------------------------------------------------
def _who(cls: type) -> str:
    """'family name (module.Class)': how every failure names the plugin."""
    family = getattr(cls, "FAMILY", "component")
    return f"{family} {getattr(cls, 'name', '?')!r} ({cls.__module__}.{cls.__qualname__})"


def _fail(who: str, check: str, message: str) -> NoReturn:
    """Raise the kit's AssertionError: plugin, check, expected vs got."""
    __tracebackhide__ = True
    raise AssertionError(f"{who} failed the {check} check: {message}")


def _call(who: str, check: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run plugin code; an exception becomes an AssertionError saying which call raised what."""
    __tracebackhide__ = True
    try:
        return fn()
    except Exception as exc:
        raise AssertionError(f"{who} failed the {check} check: {what} raised {type(exc).__name__}: {exc}") from exc


def _first_bad(mask: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True of a boolean tensor."""
    return tuple(int(i) for i in mask.nonzero()[0])


def _expect_tensor(who: str, check: str, what: str, value: Any, shape: tuple | None = None, *,
                   floating: bool = False, finite: bool = False) -> torch.Tensor:
    """`value` is a tensor of `shape` (and floating point, and finite, when asked)."""
    __tracebackhide__ = True
    if not isinstance(value, torch.Tensor):
        _fail(who, check, f"{what} should be a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        _fail(who, check, f"{what} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if floating and not value.is_floating_point():
        _fail(who, check, f"{what} has dtype {value.dtype}, expected a floating-point tensor")
    if finite and value.is_floating_point():
        bad = ~torch.isfinite(value.detach())
        if bad.any():
            at = _first_bad(bad)
            _fail(who, check, f"{what} has {int(bad.sum())} non-finite value(s) of {value.numel()} "
                              f"(first at index {at}: {value.detach()[at].item()}), expected all finite")
    return value


def _expect_codes(who: str, check: str, what: str, value: Any, shape: tuple, k: int) -> torch.Tensor:
    """`value` is an int64 tensor of `shape` with every entry in [0, k)."""
    __tracebackhide__ = True
    _expect_tensor(who, check, what, value, shape)
    if value.dtype != torch.int64:
        _fail(who, check, f"{what} has dtype {value.dtype}, expected torch.int64 code indices")
    if value.numel() and (value.min() < 0 or value.max() >= k):
        _fail(who, check, f"{what} has indices in [{int(value.min())}, {int(value.max())}], expected [0, {k})")
    return value


def _expect_close(who: str, check: str, what: str, got: torch.Tensor, want: torch.Tensor, *,
                  atol: float = 0.0, rtol: float = 0.0, hint: str = "") -> None:
    """got == want exactly (atol = rtol = 0) or within tolerance, with the largest difference in the message."""
    __tracebackhide__ = True
    _expect_tensor(who, check, what, got, tuple(want.shape))
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.is_floating_point() or want.is_floating_point():  # NaN matches NaN here; the finite checks catch it
        same = torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True)
    else:
        same = torch.equal(got, want)
    if same:
        return
    if got.numel() == 0:
        _fail(who, check, f"{what} differs{hint}")
    diff = (got.double() - want.double()).abs()  # same shape as got
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    at = _first_bad(diff == diff.max())
    tolerance = "exactly" if atol == rtol == 0 else f"within atol={atol:.3g}, rtol={rtol:.3g}"
    _fail(who, check, f"{what} should match {tolerance}, but differs by up to {diff.max().item():.6g} "
                      f"(at index {at}: got {got[at].item():.6g}, expected {want[at].item():.6g}){hint}")


def _expect_same_state(who: str, check: str, a: nn.Module, b: nn.Module, hint: str) -> None:
    """Two modules have the same state-dict keys and bit-identical tensors."""
    __tracebackhide__ = True
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        missing, extra = sorted(set(sa) - set(sb)), sorted(set(sb) - set(sa))
        _fail(who, check, f"the two state dicts have different keys (only in the first: {missing}, only in the "
                          f"second: {extra}){hint}")
    for key, value in sa.items():
        other = sb[key]
        if isinstance(value, torch.Tensor):
            _expect_close(who, check, f"state_dict[{key!r}]", other, value, hint=hint)
        elif value != other:
            _fail(who, check, f"state_dict[{key!r}] is {other!r} in one build and {value!r} in the other{hint}")


def _expect_same_outputs(who: str, check: str, got: dict, want: dict, hint: str) -> None:
    """Two {name: tensor} output dicts agree exactly."""
    __tracebackhide__ = True
    for name, value in want.items():
        _expect_close(who, check, name, got[name], value, hint=hint)


# --- shared machinery --------------------------------------------------------------------------
def _isolated(fn: Callable) -> Callable:
    """Run a check on one CPU thread without changing the caller's global torch RNG state or thread count."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        __tracebackhide__ = True
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny tensors: more threads only add synchronisation (10x slower on busy CPUs)
        try:
            with torch.random.fork_rng(devices=[]):
                return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def _options(cls: type, options: Any) -> BaseModel:
    """The options to build with: `options` (an instance or a dict), else cls.Options() when nothing is required."""
    if isinstance(options, BaseModel):
        return options
    if options is not None:
        return cls.Options.model_validate(options)
    try:
        return cls.Options()
    except ValidationError as exc:
        required = [n for n, f in cls.Options.model_fields.items() if f.is_required()]
        raise TypeError(f"{_who(cls)} has required options {required}; pass options=... to the check") from exc


def _build(who: str, check: str, make: Callable[[], Any], seed: int) -> Any:
    """make() right after torch.manual_seed(seed); a constructor error is reported as the plugin's failure."""
    __tracebackhide__ = True
    torch.manual_seed(seed)
    return _call(who, check, "the constructor", make)


def _generator(seed: int) -> torch.Generator:
    """A CPU generator for the kit's inputs, so they never depend on the global RNG."""
    return torch.Generator().manual_seed(seed)


def _uniform(shape: tuple, seed: int) -> torch.Tensor:
    """Images in [0, 1): shape (B, C, H, W)."""
    return torch.rand(shape, generator=_generator(seed))


def _normal(shape: tuple, seed: int) -> torch.Tensor:
    """Standard normal draws of any shape."""
    return torch.randn(shape, generator=_generator(seed))


def _in_eval(module: nn.Module, fn: Callable[[], Any]) -> Any:
    """fn() in eval mode under no_grad, the module's mode restored after."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            return fn()
    finally:
        module.train(was)


def _expect_module(who: str, check: str, obj: Any) -> None:
    """The component is a torch.nn.Module (its family's base class makes it one)."""
    __tracebackhide__ = True
    if not isinstance(obj, nn.Module):
        _fail(who, check, f"the instance is a {type(obj).__name__}, expected a torch.nn.Module "
                          f"(subclass the family's base class in vaeflow.core.interfaces)")


def _expect_trainable(who: str, check: str, module: nn.Module, what: str) -> None:
    """After a backward pass: some parameter got a gradient, and every gradient is finite."""
    __tracebackhide__ = True
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not params:
        return
    if all(p.grad is None for _, p in params):
        _fail(who, check, f"no parameter received a gradient from {what}; expected the output to depend on "
                          f"the parameters differentiably (is something detached, or computed under no_grad?)")
    for name, p in params:
        if p.grad is not None:
            _expect_tensor(who, check, f"the gradient of parameter {name!r}", p.grad, finite=True)


def _round_trip(who: str, trained: nn.Module, make: Callable[[], nn.Module], outputs: Callable[[nn.Module], dict],
                seed: int) -> None:
    """A build under seed + 1, after load_state_dict of `trained`'s state, gives its outputs in eval mode."""
    __tracebackhide__ = True
    check = "state-dict round trip"
    other = _build(who, check, make, seed + 1)
    _call(who, check, "load_state_dict(state_dict()) into a second instance",
          lambda: other.load_state_dict(trained.state_dict()))
    got = _in_eval(other, lambda: _call(who, check, "the outputs of the loaded instance", lambda: outputs(other)))
    want = _in_eval(trained, lambda: _call(who, check, "the outputs of the original", lambda: outputs(trained)))
    _expect_same_outputs(who, check, got, want,
                         hint="; every tensor the outputs depend on must be a parameter or a registered buffer "
                              "(self.register_buffer), so it is saved and loaded with the weights")


def _determinism(who: str, make: Callable[[], nn.Module], outputs: Callable[[nn.Module], dict], seed: int) -> nn.Module:
    """Two builds under one seed: identical state dicts and eval outputs; returns the first build."""
    __tracebackhide__ = True
    check = "determinism"
    hint = (f" (two builds after torch.manual_seed({seed})); draw initial weights from torch's global RNG, "
            f"not numpy, `random` or the OS")
    first, second = _build(who, "construction", make, seed), _build(who, "construction", make, seed)
    _expect_module(who, "construction", first)
    _expect_same_state(who, check, first, second, hint)
    want = _in_eval(first, lambda: _call(who, "forward", "running it in eval mode on the check's inputs",
                                         lambda: outputs(first)))
    got = _in_eval(second, lambda: _call(who, check, "running the second build", lambda: outputs(second)))
    _expect_same_outputs(who, check, got, want, hint)
    return first


# --- options -----------------------------------------------------------------------------------
def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field annotation (Optional[M], list[M], dict[str, M] ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _nested_models(arg)]


def _options_problems(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Fields without a description, and nested option models that accept unknown keys, as dotted names."""
    problems = []
    for name, info in model.model_fields.items():
        if not (info.description or "").strip():
            problems.append(f"field {prefix + name!r} has no description (Field(..., description=...))")
        for nested in _nested_models(info.annotation):
            if nested.model_config.get("extra") != "forbid":
                problems.append(f"nested model {nested.__name__} of field {prefix + name!r} accepts unknown keys "
                                f"(extra={nested.model_config.get('extra')!r}, expected 'forbid')")
            problems += _options_problems(nested, f"{prefix}{name}.")
    return problems


def check_options(cls: type) -> None:
    """cls.Options forbids unknown keys, describes every field, and its defaults round-trip through JSON."""
    __tracebackhide__ = True
    who, check = _who(cls), "options"
    opts = getattr(cls, "Options", None)
    if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
        _fail(who, check, f"Options is {opts!r}, expected a pydantic model (subclass vaeflow.core.interfaces.Options)")
    try:
        opts.model_validate({UNKNOWN_KEY: 1})
    except ValidationError as exc:
        if not any(e["type"] == "extra_forbidden" and tuple(e["loc"]) == (UNKNOWN_KEY,) for e in exc.errors()):
            _fail(who, check, f"the unknown key {UNKNOWN_KEY!r} was not rejected as extra_forbidden (errors: "
                              f"{[e['type'] for e in exc.errors()]}); subclass vaeflow.core.interfaces.Options, or set "
                              f"model_config = ConfigDict(extra='forbid'), so a typo in a config is an error")
    else:
        _fail(who, check, f"the unknown key {UNKNOWN_KEY!r} was accepted; subclass vaeflow.core.interfaces.Options, or set "
                          f"model_config = ConfigDict(extra='forbid'), so a typo in a config is an error")
    problems = _options_problems(opts)
    if problems:
        _fail(who, check, "; ".join(problems) + " (vaeflow config schema and error messages show the descriptions)")
    if any(f.is_required() for f in opts.model_fields.values()):
        return
    default = _call(who, check, f"{opts.__name__}() with every default", opts)
    dumped = _call(who, check, "model_dump(mode='json') of the defaults", lambda: default.model_dump(mode="json"))
    text = _call(who, check, "json.dumps of the dumped defaults", lambda: json.dumps(dumped))
    again = _call(who, check, "model_validate of the defaults' JSON dump",
                  lambda: opts.model_validate(json.loads(text)))
    if again != default or again.model_dump(mode="json") != dumped:
        _fail(who, check, f"the defaults do not round-trip through JSON: {default!r} came back as {again!r}")


# --- encoders and decoders ---------------------------------------------------------------------
@_isolated
def check_encoder(cls: type, options: Any = None, shape: tuple | None = None, out_features: int = 6,
                  stride: int = 4, batch: int = 3, seed: int = SEED) -> None:
    """Vector encoder: (B, C, H, W) -> (B, out_features); feature-map encoder: -> (B, out_features, H/s, W/s)."""
    __tracebackhide__ = True
    who, grid, options = _form(cls, options, "encoder")
    shape = tuple(shape or ((1, 32, 32) if grid else (1, 28, 28)))  # (C, H, W)
    if grid:
        if shape[1] % stride or shape[2] % stride:
            raise ValueError(f"check_encoder: stride {stride} must divide the image size {shape[1:]}")
        want = (batch, out_features, shape[1] // stride, shape[2] // stride)  # (B, D, h, w)

        def make():
            return cls(options, shape, out_features, stride)
        spec = f"cls(options, in_shape={shape}, out_channels={out_features}, stride={stride})"
    else:
        want = (batch, out_features)  # (B, out_features)

        def make():
            return cls(options, shape, out_features)
        spec = f"cls(options, in_shape={shape}, out_features={out_features})"
    x = _uniform((batch, *shape), seed + 100)  # (B, C, H, W)

    _check_forward(who, "encoder output", make, x, want, f"{spec} applied to x {tuple(x.shape)}", seed)


def _form(cls: type, options: Any, family: str) -> tuple[str, bool, BaseModel]:
    """(who, whether it is a feature-map encoder/decoder, its options), after the options check."""
    __tracebackhide__ = True
    check_options(cls)
    who, form = _who(cls), form_of(cls)
    if form is None:
        base = family.capitalize()
        _fail(who, f"{family} form", f"the class is not a vaeflow.core.interfaces.{base} or Grid{base} subclass")
    return who, form == FEATURE_MAP, _options(cls, options)


def _check_forward(who: str, what: str, make: Callable[[], nn.Module], inp: torch.Tensor, want: tuple, spec: str,
                   seed: int) -> None:
    """An encoder's or decoder's output shape in eval and train mode, its gradients, determinism and round trip."""
    __tracebackhide__ = True

    def outputs(module):
        return {what: module(inp)}

    module = _determinism(who, make, outputs, seed)
    out = _in_eval(module, lambda: _call(who, "output shape", "forward in eval mode", lambda: module(inp)))
    _expect_tensor(who, "output shape", spec, out, want, floating=True, finite=True)
    module.train()
    out = _call(who, "training forward", "forward in train mode", lambda: module(inp))  # (B, ...)
    _expect_tensor(who, "training forward", "the train-mode output", out, want, floating=True, finite=True)
    _call(who, "training forward", "backward of output.sum()", lambda: out.sum().backward())
    _expect_trainable(who, "training forward", module, "output.sum()")
    _round_trip(who, module, make, outputs, seed)


@_isolated
def check_decoder(cls: type, options: Any = None, out_shape: tuple | None = None, latent_dim: int = 4,
                  in_channels: int = 8, stride: int = 4, batch: int = 3, seed: int = SEED) -> None:
    """Vector decoder: (B, latent_dim) -> (B, *out_shape); feature-map decoder: (B, D, h, w) -> (B, P, h*s, w*s)."""
    __tracebackhide__ = True
    who, grid, options = _form(cls, options, "decoder")
    out_shape = tuple(out_shape or ((1, 32, 32) if grid else (1, 28, 28)))  # (P, H, W)
    want = (batch, *out_shape)  # (B, P, H, W)
    if grid:
        if out_shape[1] % stride or out_shape[2] % stride:
            raise ValueError(f"check_decoder: stride {stride} must divide the output size {out_shape[1:]}")
        z = _normal((batch, in_channels, out_shape[1] // stride, out_shape[2] // stride), seed + 100)  # (B, D, h, w)

        def make():
            return cls(options, in_channels, out_shape, stride)
        spec = f"cls(options, in_channels={in_channels}, out_shape={out_shape}, stride={stride})"
    else:
        z = _normal((batch, latent_dim), seed + 100)  # (B, J)

        def make():
            return cls(options, latent_dim, out_shape)
        spec = f"cls(options, latent_dim={latent_dim}, out_shape={out_shape})"

    _check_forward(who, "decoder output", make, z, want, f"{spec} applied to {tuple(z.shape)}", seed)


# --- likelihoods -------------------------------------------------------------------------------
@_isolated
def check_likelihood(cls: type, options: Any = None, shape: tuple = (1, 8, 8), batch: int = 4,
                     seed: int = SEED) -> None:
    """param_channels, log_prob (B,), mean, sample; log_prob is a sum of per-pixel terms, independent per example."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    shape = tuple(shape)
    c, h, w = shape

    def make():
        return cls(options, shape)

    probe = _build(who, "param_channels", make, seed)
    _expect_module(who, "param_channels", probe)
    p = _call(who, "param_channels", f"param_channels({c})", lambda: probe.param_channels(c))
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        _fail(who, "param_channels", f"param_channels({c}) returned {p!r}, expected a positive int")
    x = _uniform((batch, c, h, w), seed + 100)  # (B, C, H, W) data in [0, 1)
    params = _normal((batch, p, h, w), seed + 101)  # (B, P, H, W) decoder output

    def outputs(lik):
        return {"log_prob": lik.log_prob(x, params), "mean": lik.mean(params),
                "sample": lik.sample(params, generator=_generator(seed))}

    lik = _determinism(who, make, outputs, seed)
    check = "shapes"
    out = _in_eval(lik, lambda: _call(who, check, "log_prob, mean, sample", lambda: outputs(lik)))
    _expect_tensor(who, check, f"log_prob(x {tuple(x.shape)}, params {tuple(params.shape)})", out["log_prob"],
                   (batch,), floating=True, finite=True)
    _expect_tensor(who, check, f"mean(params {tuple(params.shape)})", out["mean"], (batch, c, h, w), floating=True,
                   finite=True)
    _expect_tensor(who, check, f"sample(params {tuple(params.shape)})", out["sample"], (batch, c, h, w),
                   floating=True, finite=True)
    again = _in_eval(lik, lambda: lik.sample(params, generator=_generator(seed)))  # (B, C, H, W)
    _expect_close(who, "sample reproducibility", "sample(params, generator) drawn twice from one seed", again,
                  out["sample"], hint="; draw from the `generator` argument, not the global RNG")

    lp = out["log_prob"]  # (B,)
    scale = 1.0 + lp.abs().max().item()  # float32 sums over pixels: compare relative to their size
    rows = _in_eval(lik, lambda: torch.cat([lik.log_prob(x[i:i + 1], params[i:i + 1]) for i in range(batch)]))  # (B,)
    _expect_close(who, "batch independence", "log_prob of each example computed alone (got) and in the batch "
                  "(expected)", rows, lp, atol=1e-5 * scale,
                  rtol=1e-5, hint="; log p(x_i | params_i) must not depend on the other examples of the batch")
    twin_x, twin_p = x[:1].repeat(2, 1, 1, 1), params[:1].repeat(2, 1, 1, 1)  # (2, C, H, W), (2, P, H, W)
    twins = _in_eval(lik, lambda: lik.log_prob(twin_x, twin_p))  # (2,)
    _expect_close(who, "batch independence", "log_prob of the second of two identical rows", twins[1:], twins[:1],
                  atol=1e-5 * scale, rtol=1e-5)

    # Known answer: log p(x) = sum over pixels of a per-pixel term, so setting one pixel to a instead of b changes
    # log p by the same amount whatever the other pixels hold. Four backgrounds as different as data gets (random,
    # its negative, all 0, all 1), one set of parameters, two pixels.
    backgrounds = torch.stack([x[0], 1 - x[0], torch.zeros_like(x[0]), torch.ones_like(x[0])])  # (4, C, H, W)
    same_params = params[:1].expand(2 * len(backgrounds), -1, -1, -1)  # (8, P, H, W)
    for pixel in ((0, h // 2, w // 3), (c - 1, h - 1, 0)):
        rows = backgrounds.repeat_interleave(2, dim=0).clone()  # (8, C, H, W): each background twice
        rows[0::2][(slice(None), *pixel)] = 0.1
        rows[1::2][(slice(None), *pixel)] = 0.9
        lp8 = _in_eval(lik, lambda: _call(who, "per-pixel sum", "log_prob", lambda: lik.log_prob(rows, same_params)))
        _expect_tensor(who, "per-pixel sum", "log_prob of 8 rows", lp8, (8,), floating=True, finite=True)
        change = lp8[0::2] - lp8[1::2]  # (4,) log p(pixel = 0.1) - log p(pixel = 0.9) on each background
        _expect_close(who, "per-pixel sum", f"log p(x | x{list(pixel)} = 0.1) - log p(x | x{list(pixel)} = 0.9) on "
                      f"the backgrounds [random, 1 - random, zeros, ones]", change, change[:1].expand(4),
                      atol=1e-4 * (1.0 + lp8.abs().max().item()), rtol=1e-4,
                      hint="; log_prob must be a sum over pixels of a per-pixel term (pixels independent given "
                           "params), so the change may not depend on the other pixels")

    check = "gradient"
    lik.train()
    params_grad = params.clone().requires_grad_(True)  # (B, P, H, W)
    total = _call(who, check, "log_prob in train mode", lambda: lik.log_prob(x, params_grad).sum())
    _call(who, check, "backward of log_prob(x, params).sum()", lambda: total.backward())
    if params_grad.grad is None:
        _fail(who, check, "log_prob(x, params) gave no gradient to params; the decoder trains through it")
    _expect_tensor(who, check, "the gradient of log_prob with respect to params", params_grad.grad, finite=True)
    _round_trip(who, lik, make, outputs, seed)


# --- quantizers --------------------------------------------------------------------------------
def _expect_quantizer_output(who: str, check: str, out: Any, z_shape: tuple, k: int) -> None:
    """QuantizerOutput with quantized (B, D, h, w), indices (B, h, w) in [0, K), finite scalar losses and stats."""
    __tracebackhide__ = True
    if not isinstance(out, QuantizerOutput):
        _fail(who, check, f"forward returned {type(out).__name__}, expected vaeflow.core.interfaces.QuantizerOutput")
    b, _, h, w = z_shape
    _expect_tensor(who, check, "quantized", out.quantized, z_shape, floating=True, finite=True)
    _expect_codes(who, check, "indices", out.indices, (b, h, w), k)
    for group in ("losses", "stats"):
        values = getattr(out, group)
        if not isinstance(values, dict):
            _fail(who, check, f"{group} is {type(values).__name__}, expected a dict of scalar tensors")
        for name, value in values.items():
            _expect_tensor(who, check, f"{group}[{name!r}]", value, (), floating=True, finite=True)


@_isolated
def check_quantizer(cls: type, options: Any = None, embedding_dim: int = 8, grid: tuple = (4, 4), batch: int = 4,
                    seed: int = SEED) -> None:
    """Quantize (B, D, h, w): indices in [0, K), lookup(indices) == quantized in eval, straight-through gradient."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    h, w = grid
    z_shape = (batch, embedding_dim, h, w)
    z_e = _normal(z_shape, seed + 100)  # (B, D, h, w)

    def make():
        return cls(options, embedding_dim)

    def outputs(q):
        out = q(z_e)
        return {"quantized": out.quantized, "indices": out.indices,
                **{f"losses[{n!r}]": v for n, v in out.losses.items()}}

    quantizer = _determinism(who, make, outputs, seed)
    k = quantizer.codebook_size
    if not isinstance(k, int) or k < 1:
        _fail(who, "codebook", f"codebook_size is {k!r}, expected a positive int (options.codebook_size)")
    book = _call(who, "codebook", "the codebook property", lambda: quantizer.codebook)
    _expect_tensor(who, "codebook", "codebook", book, (k, embedding_dim), floating=True, finite=True)

    def eval_checks(stage: str) -> None:
        check = f"eval-mode lookup ({stage})"
        before = {n: t.clone() for n, t in quantizer.state_dict().items()}
        out = _in_eval(quantizer, lambda: _call(who, check, "forward in eval mode", lambda: quantizer(z_e)))
        _expect_quantizer_output(who, check, out, z_shape, k)
        looked = _in_eval(quantizer, lambda: _call(who, check, "lookup(indices)",
                                                   lambda: quantizer.lookup(out.indices)))  # (B, D, h, w)
        _expect_close(who, check, "lookup(indices)", looked, out.quantized, atol=1e-5, rtol=1e-5,
                      hint="; in eval mode the quantized vectors must be the codebook rows the indices name")
        for name, value in quantizer.state_dict().items():
            _expect_close(who, "eval mode leaves the state alone", f"state_dict[{name!r}] after an eval forward",
                          value, before[name], hint="; only training may update codebooks and usage statistics")

    eval_checks("fresh")
    check = "straight-through gradient"
    quantizer.train()
    z = z_e.clone().requires_grad_(True)  # (B, D, h, w)
    out = _call(who, check, "forward in train mode", lambda: quantizer(z))
    _expect_quantizer_output(who, check, out, z_shape, k)
    if not out.quantized.requires_grad:
        _fail(who, check, "quantized does not require grad when z_e does; pass the decoder's gradient to z_e with "
                          "the straight-through estimator (e.g. z_e + (e - z_e).detach())")
    _call(who, check, "backward of quantized.sum()", lambda: out.quantized.sum().backward())
    if z.grad is None or not z.grad.abs().sum() > 0:
        _fail(who, check, f"z_e.grad is {'None' if z.grad is None else 'all zero'} after quantized.sum().backward(); "
                          f"expected the straight-through estimator to copy the gradient to z_e")
    _expect_tensor(who, check, "z_e.grad", z.grad, z_shape, finite=True)
    eval_checks("after a training forward")
    _round_trip(who, quantizer, make, outputs, seed)


# --- code priors -------------------------------------------------------------------------------
@_isolated
def check_code_prior(cls: type, options: Any = None, codebook_size: int = 8, grid: tuple = (4, 4),
                     condition: tuple | None = None, batch: int = 3, seed: int = SEED) -> None:
    """Logits (B, K, h, w), causal in raster order; log_prob == -cross-entropy summed; reproducible sample()."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    k, (h, w), n = codebook_size, tuple(grid), grid[0] * grid[1]
    gen = _generator(seed + 100)
    codes = torch.randint(k, (batch, h, w), generator=gen)  # (B, h, w)

    def conditions(m: int) -> torch.Tensor | None:
        """m conditioning grids (m, hc, wc), or None for an unconditional prior."""
        if condition is None:
            return None
        kc, (hc, wc) = condition
        return torch.randint(kc, (m, hc, wc), generator=gen)

    cond = conditions(batch)  # (B, hc, wc) or None

    def make():
        return cls(options, k, (h, w), condition)

    def outputs(prior):
        return {"logits": prior(codes, cond)}

    prior = _determinism(who, make, outputs, seed)
    check = "logits"
    logits = _in_eval(prior, lambda: _call(who, check, "forward(codes, condition)", lambda: prior(codes, cond)))
    _expect_tensor(who, check, f"forward(codes {tuple(codes.shape)})", logits, (batch, k, h, w), floating=True,
                   finite=True)

    check = "causality"
    base = logits.flatten(2)  # (B, K, n)
    tol = 1e-5 * (1.0 + base.abs().max().item())
    for i in sorted({0, 1, w - 1, w, n // 2, n - 2, n - 1} & set(range(n))):
        r, c = divmod(i, w)
        changed = codes.clone()  # (B, h, w)
        if k > 1:
            changed[:, r, c] = (codes[:, r, c] + 1 + torch.randint(k - 1, (batch,), generator=gen)) % k
        after = _in_eval(prior, lambda: prior(changed, cond)).flatten(2)  # (B, K, n)
        moved = (after[..., :i + 1] - base[..., :i + 1]).abs().amax(dim=(0, 1))  # (i + 1,)
        if moved.max() > tol:
            j = int((moved > tol).nonzero()[0])
            _fail(who, check, f"changing the code at raster position {i} (row {r}, column {c}) changed the logits at "
                              f"position {j} (row {j // w}, column {j % w}) by up to {moved[j].item():.4g}; the logits "
                              f"at a position may depend only on the codes strictly before it in raster order")

    check = "log_prob"
    lp = _in_eval(prior, lambda: _call(who, check, "log_prob(codes, condition)", lambda: prior.log_prob(codes, cond)))
    _expect_tensor(who, check, "log_prob(codes)", lp, (batch,), floating=True, finite=True)
    want = -F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)  # (B,)
    _expect_close(who, check, "log_prob(codes)", lp, want, atol=1e-4 * (1 + want.abs().max().item()), rtol=1e-5,
                  hint="; expected -cross_entropy(forward(codes), codes) summed over the grid, in nats")
    if k ** n <= 4096:  # small enough to enumerate: the probabilities of every code grid sum to 1
        every = torch.cartesian_prod(*[torch.arange(k)] * n).reshape(-1, h, w)  # (K^n, h, w)
        cond_all = None if cond is None else cond[:1].expand(len(every), -1, -1)  # (K^n, hc, wc)
        lp_all = _in_eval(prior, lambda: prior.log_prob(every, cond_all))  # (K^n,)
        total = torch.logsumexp(lp_all.double(), 0).exp().item()
        if not abs(total - 1.0) < 1e-4:
            _fail(who, "normalisation", f"the probabilities exp(log_prob) of all {k}^{n} code grids sum to "
                                        f"{total:.6g}, expected 1 (an autoregressive prior is normalised when it is "
                                        f"causal and its logits are per-position log-softmax inputs)")

    check = "sample"
    m = 4
    cond_m = conditions(m)  # (m, hc, wc) or None
    draws = [_in_eval(prior, lambda: _call(who, check, "sample(n, condition, temperature, top_k, generator)",
                                           lambda: prior.sample(m, cond_m, 1.0, None, _generator(seed))))
             for _ in range(2)]  # positional, as vaeflow.core.codes.sample_codes calls it
    _expect_codes(who, check, f"sample({m}, ...)", draws[0], (m, h, w), k)
    _expect_close(who, check, "a second sample with the same generator seed", draws[1], draws[0],
                  hint="; draw from the `generator` argument, not the global RNG")
    by_name = _in_eval(prior, lambda: prior.sample(m, condition=cond_m, generator=_generator(seed)))  # (m, h, w)
    _expect_close(who, check, "sample(n, condition=..., generator=...) by keyword", by_name, draws[0])

    check = "gradient"
    prior.train()
    total = _call(who, check, "log_prob in train mode", lambda: prior.log_prob(codes, cond).sum())
    _call(who, check, "backward of log_prob(codes).sum()", lambda: total.backward())
    _expect_trainable(who, check, prior, "log_prob(codes).sum()")
    _round_trip(who, prior, make, outputs, seed)


# --- continuous latent priors ------------------------------------------------------------------
def _tiny_host(latent_dim: int):
    """The kit's tiny continuous model at `latent_dim`, in eval mode: what the latent-prior check binds priors to."""
    raw = copy.deepcopy(TINY_MODELS["continuous"])
    raw["model"]["latent_dim"] = latent_dim
    torch.manual_seed(SEED)
    return build_model(validate(raw)).eval()


@_isolated
def check_latent_prior(cls: type, options: Any = None, latent_dim: int = 4, draws: int = 20000, batch: int = 3,
                       seed: int = SEED) -> None:
    """log_prob (..., J) -> (...), reproducible sample (n, J), and kl(q, z) that agrees with log q(z) - log p(z)."""
    __tracebackhide__ = True
    check_options(cls)
    who, options, j = _who(cls), _options(cls, options), latent_dim
    z = _normal((5, j), seed + 100)  # (5, J)
    z3 = _normal((2, 5, j), seed + 101)  # (2, 5, J)

    host = _tiny_host(j)  # every instance binds to this one model, as a continuous model binds its prior

    def make():
        prior = cls(options, j)
        prior.bind(host)  # LatentPrior.bind: a no-op unless p(z) is defined through q(z|x) (the VampPrior)
        return prior

    def outputs(prior):
        return {"log_prob": prior.log_prob(z), "sample": prior.sample(6, _generator(seed), 1.0)}

    prior = _determinism(who, make, outputs, seed)
    check = "log_prob"
    lp = _in_eval(prior, lambda: _call(who, check, "log_prob(z)", lambda: prior.log_prob(z)))
    _expect_tensor(who, check, f"log_prob(z {tuple(z.shape)})", lp, (5,), floating=True, finite=True)
    lp3 = _in_eval(prior, lambda: _call(who, check, "log_prob(z) with two batch dims", lambda: prior.log_prob(z3)))
    _expect_tensor(who, check, f"log_prob(z {tuple(z3.shape)})", lp3, (2, 5), floating=True, finite=True)
    alone = _in_eval(prior, lambda: prior.log_prob(z3[0]))  # (5,)
    _expect_close(who, check, "log_prob(z)[0] of a (2, 5, J) batch", lp3[0], alone, atol=1e-5, rtol=1e-5,
                  hint="; leading dimensions are batch dimensions")

    check = "sample"
    s = _in_eval(prior, lambda: _call(who, check, "sample(n, generator, temperature)",
                                      lambda: prior.sample(6, _generator(seed), 1.0)))  # positional, as VAE.generate
    _expect_tensor(who, check, "sample(6, generator)", s, (6, j), floating=True, finite=True)
    again = _in_eval(prior, lambda: prior.sample(6, generator=_generator(seed)))  # (6, J)
    _expect_close(who, check, "a second sample with the same generator seed", again, s,
                  hint="; draw on the CPU from the `generator` argument, not the global RNG")
    _expect_tensor(who, check, "log_prob of the samples", _in_eval(prior, lambda: prior.log_prob(s)), (6,), finite=True)

    # A diagonal Gaussian posterior q with random parameters: means ~ N(0, 0.7^2), log-variances in [-1, 0.5).
    gen = _generator(seed + 102)
    params = torch.cat([0.7 * torch.randn(batch, j, generator=gen),
                        1.5 * torch.rand(batch, j, generator=gen) - 1.0], dim=1)  # (B, 2J)
    q = DiagonalGaussian(params)
    check = "kl"
    torch.manual_seed(seed)  # q.rsample draws from the global RNG (restored after the check)
    z_q = q.rsample()  # (B, J)
    kl = _in_eval(prior, lambda: _call(who, check, "kl(q, z)", lambda: prior.kl(q, z_q)))
    _expect_tensor(who, check, f"kl(q, z {tuple(z_q.shape)})", kl, (batch,), floating=True, finite=True)

    # Monte Carlo: with z_1..z_N ~ q, the mean of kl(q, z_i) must match the mean of log q(z_i) - log p(z_i), both
    # estimating KL(q || p). Per example, the difference of the two means over N draws is approximately normal with
    # standard error se = std(kl - mc) / sqrt(N) (central limit theorem; 0 when kl is itself that estimate), so a
    # correct prior stays within 5 se with probability 1 - 6e-7. A further 1e-4 relative allows float32 rounding.
    # With N = 20000 and J = 4 against N(0, I), se is about 0.01 nats: an error of a few hundredths of a nat fails.
    big = DiagonalGaussian(params.repeat(draws, 1))  # N copies of q: (N*B, 2J)
    z_mc = big.rsample()  # (N*B, J)
    kl_mc = _in_eval(prior, lambda: _call(who, "Monte Carlo KL", "kl(q, z) on many draws", lambda: prior.kl(big, z_mc)))
    _expect_tensor(who, "Monte Carlo KL", "kl(q, z) on many draws", kl_mc, (draws * batch,), floating=True, finite=True)
    kl_mc = kl_mc.view(draws, batch).double()  # (N, B)
    mc = (big.log_prob(z_mc) - _in_eval(prior, lambda: prior.log_prob(z_mc))).view(draws, batch).double()  # (N, B)
    gap = kl_mc.mean(0) - mc.mean(0)  # (B,)
    se = (kl_mc - mc).std(0) / math.sqrt(draws)  # (B,)
    tol = 5 * se + 1e-4 * (1 + mc.mean(0).abs())  # (B,)
    if (gap.abs() > tol).any():
        b = int((gap.abs() > tol).nonzero()[0])
        _fail(who, "Monte Carlo KL", f"for example {b}, kl(q, z) averages {kl_mc[:, b].mean().item():.5f} over "
                                     f"{draws} draws z ~ q, but log q(z) - log p(z) averages "
                                     f"{mc[:, b].mean().item():.5f} "
                                     f"(gap {gap[b].item():.4g} > 5 standard errors + 1e-4 = {tol[b].item():.4g}); "
                                     f"kl must estimate KL(q || p) for this prior's log_prob")

    check = "kl_per_dim"
    per_dim = _in_eval(prior, lambda: _call(who, check, "kl_per_dim(q)", lambda: prior.kl_per_dim(q)))
    if per_dim is not None:
        _expect_tensor(who, check, "kl_per_dim(q)", per_dim, (batch, j), floating=True, finite=True)
        _expect_close(who, check, "kl_per_dim(q).sum(1)", per_dim.sum(1), kl, atol=1e-5 * (1 + kl.abs().max().item()),
                      rtol=1e-5, hint="; kl_per_dim, when it is not None, is the closed form whose sum is kl(q, z)")

    check = "gradient"
    prior.train()
    p = params.clone().requires_grad_(True)  # (B, 2J)
    q_grad = DiagonalGaussian(p)
    total = _call(who, check, "kl(q, z) with gradients", lambda: prior.kl(q_grad, q_grad.rsample()).sum())
    _call(who, check, "backward of kl(q, z).sum()", lambda: total.backward())
    if p.grad is None:
        _fail(who, check, "kl(q, z) gave no gradient to the posterior's parameters; the encoder trains through it")
    _expect_tensor(who, check, "the gradient of kl with respect to the posterior parameters", p.grad, finite=True)
    _round_trip(who, prior, make, outputs, seed)


# --- weight schedules --------------------------------------------------------------------------
SCHEDULE_STEPS = (0, 1, 10, 1000, 10**6)


@_isolated
def check_schedule(cls: type, options: Any = None) -> None:
    """beta(step) finite and >= 0, the same at every step for a `constant` schedule; penalty(term, step) keeps the
    term's shape, is finite and passes a gradient; logged(step)["beta"] is beta(step)."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    schedule = _call(who, "construction", "cls(options)", lambda: cls(options))
    betas = [_call(who, "beta", f"beta({t})", lambda t=t: schedule.beta(t)) for t in SCHEDULE_STEPS]
    if not all(isinstance(b, (int, float)) and math.isfinite(b) and b >= 0 for b in betas):
        _fail(who, "beta", f"beta(step) at steps {SCHEDULE_STEPS} gave {betas}; expected finite floats >= 0")
    if getattr(cls, "constant", False) and len(set(betas)) != 1:
        _fail(who, "constant", f"the class says constant = True, but beta(step) at steps {SCHEDULE_STEPS} gave {betas}")
    for t, b in zip(SCHEDULE_STEPS, betas):
        logged = _call(who, "logged", f"logged({t})", lambda t=t: schedule.logged(t))
        if logged.get("beta") != b:
            _fail(who, "logged", f"logged({t}) = {logged} does not report beta = {b}")
        term = torch.tensor([0.0, 0.5, 3.0, 40.0], requires_grad=True)  # (4,) values of a KL term, nats
        out = _call(who, "penalty", f"penalty(term, {t})", lambda t=t: schedule.penalty(term, t))
        _expect_tensor(who, "penalty", f"penalty(term (4,), {t})", out, (4,), floating=True, finite=True)
        _call(who, "penalty", "backward of penalty.sum()", lambda: out.sum().backward())
        if term.grad is None or not torch.isfinite(term.grad).all():
            _fail(who, "penalty", f"penalty(term, {t}) passes no finite gradient to the term: {term.grad}")


# --- noise and datasets ------------------------------------------------------------------------
@_isolated
def check_noise(cls: type, options: Any = None, shape: tuple = (1, 8, 8), batch: int = 4, seed: int = SEED) -> None:
    """noise(x) has x's shape, leaves x unchanged, and is reproducible under torch.manual_seed."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    noise = _call(who, "construction", "the constructor", lambda: cls(options))
    x = _uniform((batch, *shape), seed + 100)  # (B, C, H, W)
    keep = x.clone()
    torch.manual_seed(seed)
    out = _call(who, "shape", "noise(x)", lambda: noise(x))
    _expect_tensor(who, "shape", f"noise(x {tuple(x.shape)})", out, tuple(x.shape), floating=True, finite=True)
    if not torch.equal(x, keep):
        _fail(who, "input untouched", "noise(x) modified x in place; return a new tensor (x + eps, not x.add_(eps)): "
                                      "the denoising autoencoder scores the clean x afterwards")
    torch.manual_seed(seed)
    again = noise(x)  # (B, C, H, W)
    _expect_close(who, "determinism", f"noise(x) after torch.manual_seed({seed}) twice", again, out,
                  hint="; draw from the global torch RNG (torch.rand_like, torch.randn_like), which the engine seeds")


@_isolated
def check_dataset(cls: type, options: Any = None) -> None:
    """shape (C, H, W); every split's tensors match it (uint8, or float in [0, 1]); labels/factors None or length N."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    ds = _call(who, "construction", "the constructor", lambda: cls(options))
    if not isinstance(ds, Dataset):
        _fail(who, "construction", f"the instance is a {type(ds).__name__}, expected a vaeflow.core.interfaces.Dataset")
    shape = _call(who, "shape", "the shape property", lambda: ds.shape)
    if not (isinstance(shape, tuple) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        _fail(who, "shape", f"shape is {shape!r}, expected a tuple (C, H, W) of positive ints")
    twin = cls(options)
    for split in cls.SPLITS:
        check = f"split {split!r}"
        images = _call(who, check, f"tensors({split!r})", lambda: ds.tensors(split))
        _expect_tensor(who, check, f"tensors({split!r})", images)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape or len(images) == 0:
            _fail(who, check, f"tensors({split!r}) has shape {tuple(images.shape)}, expected (N, *shape) = "
                              f"(N >= 1, {', '.join(map(str, shape))})")
        n = len(images)
        if images.dtype != torch.uint8:
            if not images.is_floating_point():
                _fail(who, check, f"tensors({split!r}) has dtype {images.dtype}, expected uint8 or floating point")
            _expect_tensor(who, check, f"tensors({split!r})", images, finite=True)
            lo, hi = images.min().item(), images.max().item()
            if lo < 0 or hi > 1:
                _fail(who, check, f"float images span [{lo:.4g}, {hi:.4g}], expected values in [0, 1]")
        labels = _call(who, check, f"labels({split!r})", lambda: ds.labels(split))
        if labels is not None:
            _expect_tensor(who, check, f"labels({split!r})", labels, (n,))
            if labels.dtype != torch.int64:
                _fail(who, check, f"labels({split!r}) has dtype {labels.dtype}, expected torch.int64")
        factors = _call(who, check, f"factors({split!r})", lambda: ds.factors(split))
        if factors is not None:
            f = len(cls.FACTOR_NAMES)
            _expect_tensor(who, check, f"factors({split!r}) (one column per FACTOR_NAMES entry)", factors, (n, f),
                           floating=True, finite=True)
            if len(cls.FACTOR_DISCRETE) != f:
                _fail(who, check, f"FACTOR_DISCRETE has {len(cls.FACTOR_DISCRETE)} entries, expected one per factor "
                                  f"({f}: {cls.FACTOR_NAMES})")
        items = _call(who, check, f"torch_dataset({split!r})", lambda: ds.torch_dataset(split))
        if _call(who, check, f"len(torch_dataset({split!r}))", lambda: len(items)) != n:
            _fail(who, check, f"torch_dataset({split!r}) has {len(items)} items, tensors({split!r}) has {n}")
        first = _call(who, check, f"torch_dataset({split!r})[0]", lambda: items[0])
        _expect_tensor(who, check, f"torch_dataset({split!r})[0]", first, shape, floating=True, finite=True)
        if first.min() < 0 or first.max() > 1:
            _fail(who, check, f"torch_dataset({split!r})[0] spans [{first.min().item():.4g}, "
                              f"{first.max().item():.4g}], expected float values in [0, 1]")
        _expect_close(who, "determinism", f"tensors({split!r}) of a second instance with the same options",
                      twin.tensors(split), images, hint="; a dataset must be a pure function of its options")
    sources = _call(who, "sources", "sources()", ds.sources)
    if not isinstance(sources, list):
        _fail(who, "sources", f"sources() returned {type(sources).__name__}, expected a list of Paths")
    missing = [str(p) for p in sources if not Path(p).is_file()]
    if missing:
        _fail(who, "sources", f"sources() lists files that do not exist: {missing}")


# --- models ------------------------------------------------------------------------------------
def _as_config(config: Any):
    """A validated Config from a Config, a YAML path or a raw dict."""
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, dict):
        return validate(config)
    raise TypeError(f"config must be a Config, a YAML path or a dict, got {type(config).__name__}")


def _small_config(cfg, steps: int, batch_size: int, sets: tuple | list):
    """cfg with a short CPU training run and, for the shapes dataset, a tiny one."""
    small = [f"train.max_steps={steps}", "train.epochs=1", "train.progress=false", f"train.batch_size={batch_size}",
             "train.device=cpu", "train.compile=false", "train.checkpoint_every=null"]
    if cfg.data.dataset.name == "shapes":
        small += ["data.dataset.n_train=64", "data.dataset.n_test=16"]
    return apply_sets(cfg, [*small, *sets])


def _level_info(model) -> dict:
    """{level: {grid, codebook_size, condition}} of a discrete model, as vaeflow.core.priors.build_prior takes it."""
    return {lv: {"grid": list(model.grids[lv]), "codebook_size": model.codebook_sizes[lv],
                 "condition": model.condition_of(lv)} for lv in model.levels}


def _code_priors(model, cfg) -> dict:
    """The code priors cfg.prior names for the model's levels, built untrained (eval mode)."""
    levels, priors = _level_info(model), {}
    for level in model.levels:
        spec = getattr(cfg.prior, level, None)
        if spec is not None:
            priors[level] = build_prior(spec.model_dump(mode="json"), level, levels).eval()
    return priors


def _check_objective(who: str, cls: type, out: Any) -> None:
    """forward(x) -> Objective of finite 0-d terms (the scheduled one among them), weights and 0-d stats."""
    __tracebackhide__ = True
    check = "objective"
    if not isinstance(out, Objective):
        _fail(who, check, f"forward(x) returned {type(out).__name__}, expected vaeflow.core.interfaces.Objective")
    if not isinstance(out.terms, dict) or not out.terms:
        _fail(who, check, f"Objective.terms is {out.terms!r}, expected a non-empty dict of scalar loss terms")
    for name, term in out.terms.items():
        _expect_tensor(who, check, f"terms[{name!r}]", term, (), floating=True, finite=True)
    for name, weight in out.weights.items():
        if name not in out.terms:
            _fail(who, check, f"weights names {name!r}, which is not a term (terms: {sorted(out.terms)})")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight)):
            _fail(who, check, f"weights[{name!r}] is {weight!r}, expected a finite float")
    for name, stat in out.stats.items():
        _expect_tensor(who, check, f"stats[{name!r}]", stat, (), finite=True)
        if stat.requires_grad:
            _fail(who, check, f"stats[{name!r}] requires grad; stats are detached scalars (use .detach())")
    if cls.scheduled is not None and cls.scheduled not in out.terms:
        _fail(who, check, f"scheduled = {cls.scheduled!r} is not one of the terms {sorted(out.terms)}; the beta "
                          f"schedule applies to that term (set scheduled = None when there is none)")


def _check_continuous(who: str, model, x: torch.Tensor, param_shape: tuple) -> None:
    """posterior(x).mode() (B, J), decode(z) -> likelihood parameters, generate reproducible, ELBO terms."""
    __tracebackhide__ = True
    b, caps = len(x), model.capabilities
    check = "continuous latents"
    j = getattr(model, "latent_dim", None)
    if not isinstance(j, int) or j < 1:
        _fail(who, check, f"model.latent_dim is {j!r}, expected a positive int (capabilities.continuous)")
    mode = _call(who, check, "posterior(x).mode()", lambda: model.posterior(x).mode())
    _expect_tensor(who, check, f"posterior(x {tuple(x.shape)}).mode()", mode, (b, j), floating=True, finite=True)
    params = _call(who, check, "decode(z)", lambda: model.decode(mode))
    _expect_tensor(who, check, f"decode(z {tuple(mode.shape)})", params, (b, *param_shape), floating=True, finite=True)
    if caps.sampling:
        check = "sampling"
        n = 3
        first = _call(who, check, "generate(n, generator)", lambda: model.generate(n, _generator(0)))
        _expect_tensor(who, check, f"generate({n}, generator)", first, (n, *x.shape[1:]), floating=True, finite=True)
        again = model.generate(n, _generator(0))  # (n, C, H, W)
        _expect_close(who, check, "generate with the same generator seed again", again, first,
                      hint="; draw from the `generator` argument, not the global RNG")
    if caps.log_likelihood is not None:
        check = f"log likelihood ({caps.log_likelihood})"
        terms = _call(who, check, "elbo_terms(x)", lambda: model.elbo_terms(x))
        if not (isinstance(terms, tuple) and len(terms) == 3):
            _fail(who, check, f"elbo_terms(x) returned {type(terms).__name__}, expected a tuple "
                              f"(log p(x|z) (B,), KL (B,), KL per dimension (B, J) or None)")
        _expect_tensor(who, check, "elbo_terms(x)[0], log p(x|z)", terms[0], (b,), floating=True, finite=True)
        _expect_tensor(who, check, "elbo_terms(x)[1], the KL", terms[1], (b,), floating=True, finite=True)
        if terms[2] is not None:
            _expect_tensor(who, check, "elbo_terms(x)[2], the KL per dimension", terms[2], (b, j), floating=True,
                           finite=True)
        k = 3
        joint = _call(who, check, f"log_joint_terms(x, {k})", lambda: model.log_joint_terms(x, k))
        _expect_tensor(who, check, f"log_joint_terms(x, {k})", joint, (k, b), floating=True, finite=True)


def _check_discrete(who: str, cls: type, model, cfg, x: torch.Tensor, param_shape: tuple) -> None:
    """levels, grids and codebook sizes; encode_codes -> int64 grids; decode_codes -> likelihood parameters."""
    __tracebackhide__ = True
    b, check = len(x), "discrete latents"
    levels = tuple(getattr(model, "levels", ()))
    if not levels:
        _fail(who, check, "model.levels is empty; a discrete model names its code levels in sampling order")
    declared = tuple(cls.levels_of(cfg.model))
    if declared != levels:
        _fail(who, check, f"model.levels is {levels}, but {cls.__name__}.levels_of(options) says {declared}")
    grids, sizes = getattr(model, "grids", {}), getattr(model, "codebook_sizes", {})
    for level in levels:
        if level not in grids or level not in sizes:
            _fail(who, check, f"level {level!r} is missing from model.grids {grids} or model.codebook_sizes {sizes}")
        given = cls.condition_of(level)
        if given is not None and (given not in levels or levels.index(given) >= levels.index(level)):
            _fail(who, check, f"condition_of({level!r}) is {given!r}, expected None or a level sampled before it "
                              f"(levels in sampling order: {levels})")
    codes = _call(who, check, "encode_codes(x)", lambda: model.encode_codes(x))
    if not isinstance(codes, dict) or set(codes) != set(levels):
        _fail(who, check, f"encode_codes(x) returned keys {sorted(codes) if isinstance(codes, dict) else codes!r}, "
                          f"expected one code grid per level {levels}")
    for level in levels:
        _expect_codes(who, check, f"encode_codes(x)[{level!r}]", codes[level], (b, *grids[level]), sizes[level])
    params = _call(who, check, "decode_codes(codes)", lambda: model.decode_codes(codes))
    _expect_tensor(who, check, "decode_codes(encode_codes(x))", params, (b, *param_shape), floating=True, finite=True)
    priors = _code_priors(model, cfg) if model.capabilities.sampling else {}
    if priors and set(priors) == set(levels):
        n = 2
        images = _call(who, "sampling", "vaeflow.core.codes.sample_images with the config's code priors",
                       lambda: sample_images(model, priors, n, seed=0))
        _expect_tensor(who, "sampling", f"{n} images sampled through the code priors", images, (n, *x.shape[1:]),
                       floating=True, finite=True)


@_isolated
def check_model(config: Any, steps: int = 2, batch: int = 4, batch_size: int = 16, seed: int = SEED,
                sets: tuple | list = ()) -> None:
    """Build a model kind from `config`, check its objective and capabilities, round-trip its state, train `steps`."""
    __tracebackhide__ = True
    cfg = _small_config(_as_config(config), steps, batch_size, sets)
    cls = get_registry().get("model", cfg.model.kind).cls
    who = _who(cls)
    check_options(cls)
    caps = cls.capabilities
    if not isinstance(caps, Capabilities):
        _fail(who, "capabilities", f"capabilities is {caps!r}, expected a vaeflow.core.interfaces.Capabilities")
    if caps.log_likelihood not in (None, "bound", "exact"):
        _fail(who, "capabilities", f"log_likelihood is {caps.log_likelihood!r}, expected None, 'bound' or 'exact'")
    shape = data_shape(cfg)  # (C, H, W)
    x = load_split(cfg, "test")[:batch]  # (B, C, H, W) in [0, 1]

    def make():
        return build_model(cfg)

    def outputs(m):
        return {"reconstruct(x)": m.reconstruct(x)}

    model = _determinism(who, make, outputs, seed)
    lik = getattr(model, "likelihood", None)
    if (caps.continuous or caps.discrete) and lik is None:
        _fail(who, "likelihood", "the model has no `likelihood`; renderers, metrics and sampling decode through "
                                 "model.likelihood.mean(...)")
    param_shape = (lik.param_channels(shape[0]), *shape[1:]) if lik is not None else None  # (P, H, W)

    model.train()
    out = _call(who, "objective", "forward(x) in train mode", lambda: model(x))
    _check_objective(who, cls, out)
    loss = sum(out.weights.get(n, 1.0) * t for n, t in out.terms.items())  # ()
    _call(who, "objective", "backward of the weighted sum of the terms", lambda: loss.backward())
    _expect_trainable(who, "objective", model, "the weighted sum of the terms")
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        before = model.state_hash()
        recon = _call(who, "reconstruct", "reconstruct(x) in eval mode", lambda: model.reconstruct(x))
        _expect_tensor(who, "reconstruct", f"reconstruct(x {tuple(x.shape)})", recon, tuple(x.shape), floating=True,
                       finite=True)
        if caps.continuous:
            _check_continuous(who, model, x, param_shape)
        if caps.discrete:
            _check_discrete(who, cls, model, cfg, x, param_shape)
        if model.state_hash() != before:
            _fail(who, "eval mode leaves the state alone", "reconstructing, encoding or sampling in eval mode changed "
                                                           "the state dict; only training may update weights, "
                                                           "codebooks or statistics")
    model.train()
    _round_trip(who, model, make, outputs, seed)

    check = "training"
    with tempfile.TemporaryDirectory(prefix="vaeflow-conformance-") as tmp:
        trainer = _call(who, check, "vaeflow.core.engine.Trainer(cfg, run_dir)", lambda: Trainer(cfg, tmp))
        result = _call(who, check, f"Trainer.fit() for {steps} steps", trainer.fit)
        if result.steps != trainer.total_steps:
            _fail(who, check, f"training stopped after {result.steps} steps, expected {trainer.total_steps}")
        bad = {k: v for k, v in result.final.items() if isinstance(v, (int, float)) and not math.isfinite(v)}
        if bad:
            _fail(who, check, f"the final training record has non-finite values {bad}")
        missing = [name for name in out.terms if name not in result.final]
        if missing:
            _fail(who, check, f"the final training record lacks the terms {missing} "
                              f"(record keys: {sorted(result.final)})")
        if not (Path(tmp) / WEIGHTS_FILE).is_file():
            _fail(who, check, f"no {WEIGHTS_FILE} was written to the run directory")


# --- renderers ---------------------------------------------------------------------------------
def _tiny_model(kind: str):
    """(untrained model in eval mode, held-out images, code priors) of a tiny built-in model of a latent kind."""
    cfg = validate(TINY_MODELS[kind])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    priors = _code_priors(model, cfg) if model.capabilities.discrete else {}
    return model, load_split(cfg, "test"), priors


@_isolated
def check_renderer(cls: type, options: Any = None, model=None, images: torch.Tensor | None = None,
                   priors: dict | None = None, seed: int = SEED) -> None:
    """Render each of cls.kinds (a tiny untrained model unless given one): files exist, the model is untouched."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    kinds = tuple(getattr(cls, "kinds", ()))
    if not kinds or not set(kinds) <= {"continuous", "discrete"}:
        _fail(who, "kinds", f"kinds is {kinds!r}, expected a non-empty tuple of 'continuous' and/or 'discrete'")
    renderer = _call(who, "construction", "the constructor", lambda: cls(options))
    if model is not None:
        kind = model.capabilities.latents
        if kind not in kinds:
            raise ValueError(f"check_renderer: the model draws {kind} latents, but {who} renders {kinds}")
        if images is None:
            raise ValueError("check_renderer: pass images=(N, C, H, W) held-out images with model=")
        cases = [(kind, model.eval(), images, priors or {})]
    else:
        cases = [(kind, *_tiny_model(kind)) for kind in kinds]
    for kind, m, imgs, prs in cases:
        check = f"render ({kind} model)"
        before = m.state_hash()
        with tempfile.TemporaryDirectory(prefix="vaeflow-conformance-") as tmp:
            out_dir = Path(tmp) / "render"
            ctx = RenderContext(m, imgs, out_dir, seed, prs)
            paths = _call(who, check, "render(ctx)", lambda: renderer.render(ctx))
            if not isinstance(paths, (list, tuple)) or not paths:
                _fail(who, check, f"render returned {paths!r}, expected a non-empty list of the paths written")
            for p in paths:
                path = Path(p)
                if not path.is_file():
                    _fail(who, check, f"render returned {path}, which does not exist as a file")
                if path.stat().st_size == 0:
                    _fail(who, check, f"render wrote {path} empty")
                if not path.resolve().is_relative_to(out_dir.resolve()):
                    _fail(who, check, f"render wrote {path} outside ctx.out_dir ({out_dir})")
        if m.state_hash() != before:
            _fail(who, check, "rendering changed the model's state dict; a renderer must only read the model")


# --- metrics -----------------------------------------------------------------------------------
METRIC_EVAL = {"iwae_k": 8, "batch_size": 16}  # the eval section of the metric check: small, two batches of 32


def _json_problem(value: Any) -> str | None:
    """Why `value` cannot go into eval.json (json.dumps), or None."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _is_number(value: Any) -> bool:
    """An int or float, not a bool (a tensor or numpy scalar is not a number here: eval.json cannot hold it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metric_output(who: str, check: str, cls: type, out: Any) -> None:
    """A dict with str keys, none of evaluate's own, JSON-able values, finite numbers under headline keys, numbers
    or strings under params keys."""
    __tracebackhide__ = True
    if not isinstance(out, dict):
        _fail(who, check, f"compute(ctx) returned {type(out).__name__}, expected a dict {{key: number or list}}")
    bad = [k for k in out if not isinstance(k, str)]
    if bad:
        _fail(who, check, f"compute(ctx) returned non-string keys {bad!r}; eval.json and MLflow need str keys")
    taken = sorted(set(out) & set(COMMON_KEYS))
    if taken:
        _fail(who, check, f"compute(ctx) returned {taken}, which evaluate itself adds; leave them out")
    for key, value in out.items():
        problem = _json_problem(value)
        if problem:
            _fail(who, check, f"out[{key!r}] = {value!r} cannot be written to eval.json ({problem}); return Python "
                              f"numbers, strings or lists of them (tensor.item(), tensor.tolist())")
    for key in cls.headline:
        if key in out and not (_is_number(out[key]) and math.isfinite(out[key])):
            _fail(who, check, f"headline key {key!r} is {out[key]!r}, expected a finite int or float")
    for key in cls.params:
        if key in out and not (_is_number(out[key]) or isinstance(out[key], str)):
            _fail(who, check, f"params key {key!r} is {out[key]!r}, expected a number or a string (an MLflow param)")


@_isolated
def check_metric(cls: type, options: Any = None, model=None, images: torch.Tensor | None = None,
                 factors: torch.Tensor | None = None, factor_names: tuple = (), factor_discrete: tuple = (),
                 config: Any = None, seed: int = SEED) -> None:
    """`needs` names Capabilities fields; `headline` and `params` are tuples of str; compute(ctx) on each tiny
    built-in model whose capabilities meet the needs (with the shapes split's known factors), or on a given model
    and images, returns a JSON-able dict with finite numbers under the headline keys it returns, the same dict
    twice after one torch.manual_seed, and leaves the model's state alone.

    `config` is the eval section (an EvalConfig or a dict; default: METRIC_EVAL)."""
    __tracebackhide__ = True
    check_options(cls)
    who, options = _who(cls), _options(cls, options)
    fields = [f.name for f in dataclasses.fields(Capabilities)]
    needs = getattr(cls, "needs", None)
    if not (isinstance(needs, tuple) and all(isinstance(n, str) for n in needs)):
        _fail(who, "needs", f"needs is {needs!r}, expected a tuple of Capabilities field names, e.g. ('continuous',)")
    unknown = [n for n in needs if n not in fields]
    if unknown:
        _fail(who, "needs", f"needs names {unknown}, which are not Capabilities fields; known fields: {fields}")
    for attr in ("headline", "params"):
        keys = getattr(cls, attr, None)
        if not (isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)):
            _fail(who, attr, f"{attr} is {keys!r}, expected a tuple of str (output keys)")
    cfg = config if isinstance(config, EvalConfig) else EvalConfig.model_validate(config or METRIC_EVAL)
    metric = _call(who, "construction", "cls(options)", lambda: cls(options))
    if model is not None:
        if not cls.applies(model.capabilities):
            raise ValueError(f"check_metric: the model's capabilities {model.capabilities} do not meet {who}'s "
                             f"needs {needs}")
        if images is None:
            raise ValueError("check_metric: pass images=(N, C, H, W) held-out images with model=")
        cases = [("the given model", model.eval(), images, factors, tuple(factor_names), tuple(factor_discrete))]
    else:
        cases = []
        for kind in TINY_MODELS:
            caps = get_registry().get("model", TINY_MODELS[kind]["model"]["kind"]).cls.capabilities
            if cls.applies(caps):
                m, imgs, _ = _tiny_model(kind)
                known = known_factors(validate(TINY_MODELS[kind]))
                cases.append((f"tiny {kind} model", m, imgs, known["factors"], tuple(known["factor_names"]),
                              tuple(known["factor_discrete"])))
        if not cases:
            _fail(who, "needs", f"needs {needs} are met by none of the kit's tiny models ({', '.join(TINY_MODELS)}); "
                                f"pass model= and images= to check it on a model that has them")
    for label, m, imgs, fac, names, discrete in cases:
        check = f"compute ({label})"
        ctx = MetricContext(m, imgs, cfg, fac, names, discrete)
        before = m.state_hash()

        def run():
            torch.manual_seed(seed)
            with torch.no_grad():
                return metric.compute(ctx)

        first = _call(who, check, "compute(ctx)", run)
        _check_metric_output(who, check, cls, first)
        if m.state_hash() != before:
            _fail(who, check, "compute(ctx) changed the model's state dict; a metric must only read the model")
        again = _call(who, "determinism", "compute(ctx) a second time", run)
        if json.dumps(again, sort_keys=True) != json.dumps(first, sort_keys=True):
            differ = sorted(k for k in set(first) | set(again) if first.get(k) != again.get(k))
            _fail(who, "determinism", f"two calls of compute(ctx) after torch.manual_seed({seed}) differ under keys "
                                      f"{differ} ({label}); draw randomness from torch's global RNG, which evaluate "
                                      f"seeds with eval.seed, not numpy, `random` or the OS")


# --- pipeline stages ---------------------------------------------------------------------------
@dataclasses.dataclass
class RecordingStageContext(StageContext):
    """The kit's StageContext: what a stage logs is recorded in these lists instead of going to MLflow."""

    metrics: list = dataclasses.field(default_factory=list)  # the dict of each log_metrics call
    params: list = dataclasses.field(default_factory=list)  # the dict of each log_params call
    artifacts: list = dataclasses.field(default_factory=list)  # (path, artifact_path) of each log_artifact call


def stage_context(cfg: Any, folder: str | Path) -> RecordingStageContext:
    """A StageContext to run a stage outside the pipeline, e.g. in a plugin's own test: `folder` is not created
    (the pipeline does not create it either: a stage makes what it writes), `log` is a logging.Logger,
    log_metrics / log_params / log_artifact record into the context's lists (log_artifact refuses a path that does
    not exist, as MLflow does), `callbacks(epochs)` is [], there is no MLflow client, and the run id is "kit"."""
    metrics: list = []
    params: list = []
    artifacts: list = []

    def log_artifact(path, artifact_path=None) -> None:
        if not Path(path).exists():
            raise FileNotFoundError(f"log_artifact({str(path)!r}): no such file or folder")
        artifacts.append((Path(path), artifact_path))

    return RecordingStageContext(
        cfg=cfg, folder=Path(folder), log=logging.getLogger("vaeflow.testing.stage"), run_id="kit", client=None,
        log_metrics=lambda m, step=0: metrics.append(dict(m)), log_params=lambda p: params.append(dict(p)),
        log_artifact=log_artifact, callbacks=lambda epochs, constant=frozenset(): [], metrics=metrics,
        params=params, artifacts=artifacts)


STAGE_NAMES = {  # class attribute -> what its entries are, with an example, for the messages
    "inputs": "stage names, e.g. ('prepare_data', 'train')",
    "optional": "stage names, e.g. ('train_prior',)",
    "sections": "whole config sections, e.g. ('eval',)",
    "reads": "config sections or dotted sub-sections, e.g. ('prior.sample',)",
    "code": "whole config sections, e.g. ('model',)",
}


def _stage_config(cls: type, config: Any):
    """The config a stage is checked with: `config`, else the kit's tiny config of a model kind that adds the
    stage (TINY_MODELS), else the tiny continuous one."""
    if config is not None:
        return _as_config(config)
    registry = get_registry()
    for raw in TINY_MODELS.values():
        if cls.name in registry.get("model", raw["model"]["kind"]).cls.stages:
            return validate(raw)
    return validate(TINY_MODELS["continuous"])


def _check_stage_declarations(who: str, cls: type) -> None:
    """inputs, optional, sections, reads and code are tuples of str naming real config sections where they
    should; folder, heavy and retries have the types the pipeline uses."""
    __tracebackhide__ = True
    for attr, what in STAGE_NAMES.items():
        value = getattr(cls, attr, None)
        if not (isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)):
            _fail(who, attr, f"{attr} is {value!r}, expected a tuple of non-empty str: {what} (a one-element tuple "
                             f"needs its comma: ('x',))")
    known = list(Config.model_fields)
    for attr in ("sections", "code"):  # hashed whole: config_hash(cfg, section), plugins_used(cfg, sections)
        bad = [s for s in getattr(cls, attr) if s not in known]
        if bad:
            _fail(who, "config sections", f"{attr} names {bad}, which are not config sections (a name that is not "
                                          f"one would silently add nothing to the key); sections: {known}")
    bad = [r for r in cls.reads if r.split(".")[0] not in known]
    if bad:
        _fail(who, "config sections", f"reads names {bad}, whose first part is not a config section; sections: "
                                      f"{known}")
    own = [n for n in (*cls.inputs, *cls.optional) if n == cls.name]
    if own:
        _fail(who, "inputs", f"the stage names itself ({cls.name!r}) among its inputs; a stage needs stages before it")
    if not (cls.folder is None or isinstance(cls.folder, str) and cls.folder):
        _fail(who, "folder", f"folder is {cls.folder!r}, expected None (the stage's name) or a folder name")
    if not isinstance(cls.heavy, bool):
        _fail(who, "heavy", f"heavy is {cls.heavy!r}, expected True or False")
    if not (isinstance(cls.retries, int) and not isinstance(cls.retries, bool) and cls.retries >= 0):
        _fail(who, "retries", f"retries is {cls.retries!r}, expected an int >= 0")


def _check_key_parts(who: str, cls: type, stages: list, cfg, inputs: dict) -> None:
    """key_parts(cfg, inputs) of every instance is a list that vaeflow.core.config.canonical_json hashes, the same on a
    second call and on a second expansion."""
    __tracebackhide__ = True
    check = "key_parts"
    twins = _call(who, check, "a second expand(cfg)", lambda: cls.expand(cfg))
    for stage, twin in zip(stages, twins):
        what = f"key_parts(cfg, inputs) of {stage.id}"
        parts = _call(who, check, what, lambda: stage.key_parts(cfg, inputs))
        if not isinstance(parts, (list, tuple)):
            _fail(who, check, f"{what} returned {type(parts).__name__}, expected a list (what the key covers besides "
                              f"the sections, the inputs' identities and the code)")
        try:
            text = canonical_json(list(parts))
        except (TypeError, ValueError) as exc:
            _fail(who, check, f"{what} returned {parts!r}, which vaeflow.core.config.canonical_json cannot hash "
                              f"({type(exc).__name__}: {exc}); return JSON data: str, numbers, bools, None, lists "
                              f"and dicts with str keys (str(path), tensor.tolist(), model_dump(mode='json'))")
        again = [canonical_json(list(_call(who, check, f"{what}, called again", lambda s=s: s.key_parts(cfg, inputs))))
                 for s in (stage, twin)]
        if any(t != text for t in again):
            other = next(t for t in again if t != text)
            _fail(who, check, f"{what} is not deterministic: {text} once, {other} on another call; the key must be a "
                              f"function of the config and the inputs (no clock, random draws or temporary paths), "
                              f"or an unchanged run never hits the cache")


def _check_stage_result(who: str, check: str, stage, result: Any, folder: Path) -> None:
    """A JSON-able dict whose `files` exist under the stage's folder, whose `sha256` is a str or None, and whose
    identity and summary are JSON-able."""
    __tracebackhide__ = True
    if not isinstance(result, dict):
        _fail(who, check, f"run(ctx, inputs) returned {type(result).__name__}, expected a dict (its result)")
    problem = _json_problem(result) or ("non-str keys" if any(not isinstance(k, str) for k in result) else None)
    if problem:
        _fail(who, check, f"run(ctx, inputs) returned {result!r}, which is not a JSON object ({problem}); the "
                          f"pipeline stores results as JSON: return str(path), not a Path, and Python numbers")
    files = result.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        _fail(who, check, f"result['files'] is {files!r}, expected a list of str paths (the files that must still "
                          f"exist for a cache hit to stand)")
    for f in files:
        path = Path(f)
        if not path.exists():
            _fail(who, check, f"result['files'] lists {f}, which does not exist")
        if not path.resolve().is_relative_to(folder.resolve()):
            _fail(who, check, f"result['files'] lists {f}, outside ctx.folder ({folder}); a stage writes its "
                              f"outputs under its own folder")
    sha = result.get("sha256")
    if not (sha is None or isinstance(sha, str)):
        _fail(who, check, f"result['sha256'] is {sha!r}, expected a str (the identity of what the stage produced, "
                          f"e.g. vaeflow.core.interfaces.file_sha256 of its main output) or None")
    identity = _call(who, check, "identity(result)", lambda: stage.identity(result))
    problem = _json_problem(identity)
    if problem:
        _fail(who, check, f"identity(result) is {identity!r}, which dependants' keys cannot hash ({problem})")
    summary = _call(who, check, "summary(result)", lambda: stage.summary(result))
    if not isinstance(summary, dict) or _json_problem(summary):
        _fail(who, check, f"summary(result) is {summary!r}, expected a JSON-able dict (the pipeline's result)")


@_isolated
def check_stage(cls: type, config: Any = None, inputs: dict | None = None) -> None:
    """A pipeline stage's declarations, expansion and cache key for a config and, given `inputs`, a run.

    Statically: the options; `inputs`, `optional`, `sections`, `reads` and `code` are tuples of str, `sections` and
    `code` name config sections (vaeflow.core.config.Config.model_fields) and so does the first part of each `reads` entry;
    check(cfg) and skipped(cfg) run; expand(cfg) returns instances of cls with unique ids; key_parts(cfg, inputs) is
    JSON data that vaeflow.core.config.canonical_json hashes, the same on every call. key_parts runs with `inputs`, or with
    {} for a stage that needs no inputs (a stage's key may read its inputs' results).

    `inputs` ({stage name: result}, the results of the stages it needs, e.g. from a real prepare_data and train;
    {param: result} for an expanded one) also runs every instance with a kit StageContext (`stage_context`: its
    folder under a temporary directory): the result is a JSON-able dict whose `files` exist under ctx.folder, with
    a `sha256` that is a str or None (left out: None).

    `config` is a Config, a YAML path or a raw dict; default: the kit's tiny config of a model kind that adds the
    stage (TINY_MODELS), else the tiny continuous one."""
    __tracebackhide__ = True
    check_options(cls)
    who = _who(cls)
    _check_stage_declarations(who, cls)
    cfg = _stage_config(cls, config)
    try:
        cls.check(cfg, "check_stage")
    except ConfigError as exc:
        raise ValueError(f"check_stage: {who} refuses the config it was given ({exc}); pass config= one it runs "
                         f"on") from exc
    except Exception as exc:
        raise AssertionError(f"{who} failed the check(cfg) check: check(cfg, source) raised {type(exc).__name__}: "
                             f"{exc}; a config the stage cannot run is a vaeflow.core.errors.ConfigError") from exc
    reason = _call(who, "skipped", "skipped(cfg)", lambda: cls.skipped(cfg))
    if not (reason is None or isinstance(reason, str)):
        _fail(who, "skipped", f"skipped(cfg) returned {reason!r}, expected None (it runs) or a str saying why not")

    check = "expand"
    stages = _call(who, check, "expand(cfg)", lambda: cls.expand(cfg))
    if not isinstance(stages, (list, tuple)) or not stages:
        _fail(who, check, f"expand(cfg) returned {stages!r}, expected a non-empty list of {cls.__name__} instances")
    wrong = [type(s).__name__ for s in stages if not isinstance(s, cls)]
    if wrong:
        _fail(who, check, f"expand(cfg) returned instances of {wrong}, expected instances of {cls.__name__}")
    ids = [_call(who, check, "the id of an expanded instance", lambda s=s: s.id) for s in stages]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        _fail(who, check, f"expand(cfg) gave the ids {ids}, which repeat {repeated}; give each instance its own "
                          f"param (its id is name_param)")

    if inputs is not None or not cls.inputs:
        _check_key_parts(who, cls, list(stages), cfg, inputs if inputs is not None else {})
    if inputs is None:
        return
    missing = [name for name in cls.inputs if name not in inputs]
    if missing:
        raise ValueError(f"check_stage: inputs lacks {missing}; {who} needs the results of {list(cls.inputs)}")
    if reason is not None:
        raise ValueError(f"check_stage: {who} skips this config ({reason}); pass config= one it runs on")
    run_cfg = apply_sets(cfg, ["train.progress=false"])  # as on a worker: Prefect log lines, no progress bar
    with tempfile.TemporaryDirectory(prefix="vaeflow-conformance-") as tmp:
        for stage in stages:
            check = f"run ({stage.id})"
            folder = Path(tmp) / (cls.folder or cls.name) / stage.id
            ctx = stage_context(run_cfg, folder)
            result = _call(who, check, "run(ctx, inputs)", lambda: stage.run(ctx, inputs))
            _check_stage_result(who, check, stage, result, folder)


# --- by registry name --------------------------------------------------------------------------
CHECKS: dict[str, Callable[..., None]] = {
    "encoder": check_encoder,
    "decoder": check_decoder,
    "likelihood": check_likelihood,
    "quantizer": check_quantizer,
    "prior": check_code_prior,
    "latent_prior": check_latent_prior,
    "noise": check_noise,
    "dataset": check_dataset,
    "renderer": check_renderer,
    "schedule": check_schedule,
    "metric": check_metric,
    "stage": check_stage,
}


def check_plugin(family: str, name: str, **kwargs: Any) -> None:
    """Look a plugin up in the registry and run its family's check (a model kind needs config=...)."""
    __tracebackhide__ = True
    registry = get_registry()
    if family not in registry.entries:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(registry.entries)}")
    try:
        cls = registry.get(family, name).cls
    except PluginError as exc:
        failures = "; ".join(reason for _, reason in registry.failures) or "none"
        raise AssertionError(f"{family} {name!r} is not registered: {exc} (plugins that failed to load: "
                             f"{failures})") from None
    if family == "model":
        config = kwargs.pop("config", None)
        if config is None:
            raise TypeError(f"check_plugin('model', {name!r}) needs config=: a config (Config, YAML path or dict) "
                            f"with model.kind: {name} and small components")
        cfg = _as_config(config)
        if cfg.model.kind != name:
            raise ValueError(f"check_plugin('model', {name!r}) was given a config of kind {cfg.model.kind!r}")
        return check_model(cfg, **kwargs)
    if not issubclass(cls, Component):  # pragma: no cover - the registry enforces the base classes
        _fail(_who(cls), "registration", "the class does not subclass vaeflow.core.interfaces.Component")
    return CHECKS[family](cls, **kwargs)


__all__ = [
    "check_options", "check_encoder", "check_decoder", "check_likelihood", "check_quantizer", "check_code_prior",
    "check_latent_prior", "check_schedule", "check_noise", "check_dataset", "check_model", "check_renderer",
    "check_metric", "check_stage", "check_plugin", "stage_context", "RecordingStageContext",
    "TINY_MODELS", "CHECKS",
]
