"""The vaeflow hook specification: one hook per component family.

Every hook receives a ``register`` callback, in the style of the llm project:
the plugin calls ``register(cls)`` once per component it provides, where ``cls``
subclasses the family's base class from :mod:`vaeflow.core.interfaces` and sets a
class attribute ``name`` (the name a config selects it by) and a nested
pydantic ``Options`` model with ``extra="forbid"``. ``register(cls, name="x")``
registers under another name. The host validates every registration and
rejects name clashes in one place (:mod:`vaeflow.core.registry`), so hooks return
nothing. Built-in components in ``plugins/`` use exactly these hooks, through
the same ``vaeflow`` entry-point group that third-party packages use.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "vaeflow"
PLUGIN_API_VERSION = 1  # bumped when a hook's contract changes; a plugin module may pin it as VAEFLOW_PLUGIN_API

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def register_encoders(register: Register) -> None:
    """Register encoders: x (B, C, H, W) -> posterior parameters (B, P) or a feature map."""


@hookspec
def register_decoders(register: Register) -> None:
    """Register decoders: z (B, J) or a feature map (B, D, h, w) -> likelihood parameters (B, P, H, W)."""


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizers: z_e (B, D, h, w) -> QuantizerOutput (quantized, indices, losses, stats)."""


@hookspec
def register_likelihoods(register: Register) -> None:
    """Register likelihoods p(x|z): log_prob(x, params) -> (B,) log-density per example."""


@hookspec
def register_priors(register: Register) -> None:
    """Register autoregressive priors over code grids: forward(codes, condition) -> logits (B, K, h, w)."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: a shape (C, H, W) and train/test splits of images in [0, 1]."""


@hookspec
def register_noises(register: Register) -> None:
    """Register input corruptions for the denoising autoencoder: x -> x_tilde, same shape."""


@hookspec
def register_renderers(register: Register) -> None:
    """Register renderers: render(RenderContext) -> image files (traversals, phase diagrams, ...)."""


@hookspec
def register_latent_priors(register: Register) -> None:
    """Register continuous priors p(z) over latent vectors: log_prob(z), sample(n), kl(q, z)."""


@hookspec
def register_models(register: Register) -> None:
    """Register model kinds: Options, slots (the components they need), capabilities, objective and prior."""


@hookspec
def register_schedules(register: Register) -> None:
    """Register weight schedules for a model's scheduled term (train.beta.schedule): beta(step), penalty(term, step)."""


@hookspec
def register_stages(register: Register) -> None:
    """Register pipeline stages (vaeflow.core.interfaces.Stage) that model kinds add by name in Model.stages."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register evaluation metrics (vaeflow.core.interfaces.Metric): the capabilities they need and their headline keys."""
