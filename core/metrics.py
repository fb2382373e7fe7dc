"""Test-split evaluation: runs every registered metric (family "metric") that a model's capabilities allow.

The metrics themselves are plugins (the built-ins in plugins/metrics.py: latent, codebook, disentanglement); this
module holds what they share (bits per dimension, the IWAE bound) and what callers ask of them (the headline keys
to print, the keys that are MLflow params).
"""

from __future__ import annotations

import math

import torch

from vaeflow.core.config import EvalConfig
from vaeflow.core.errors import PluginError
from vaeflow.core.interfaces import Capabilities, MetricContext, Model
from vaeflow.core.registry import Entry, Registry, get_registry

LN2 = math.log(2.0)
COMMON_KEYS = ("examples", "dims")  # what evaluate itself adds: the number of test images, pixels per image


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    """Convert nats per image to bits per dimension."""
    return nats_per_image / (dims * LN2)


@torch.no_grad()
def iwae_log_likelihood(model: Model, x: torch.Tensor, k: int, chunk: int | None = None) -> torch.Tensor:
    """Importance-weighted bound (Burda et al. 2016): log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q: (B,).

    k = 1 gives a single-sample ELBO estimate; the bound rises with k towards log p(x).
    Samples are decoded `chunk` at a time (default: about 1000 images per chunk). Bigger
    temporaries cross glibc's mmap threshold and are faulted in afresh on every call, which
    measured here made the whole evaluation 1.45x slower.
    """
    chunk = chunk or max(1, 1000 // len(x))
    parts = []
    for start in range(0, k, chunk):
        parts.append(model.log_joint_terms(x, min(chunk, k - start)))  # (k_i, B)
    log_w = torch.cat(parts)  # (k, B)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def applicable_metrics(capabilities: Capabilities, registry: Registry | None = None) -> list[Entry]:
    """The registered metrics whose needs these capabilities meet, in registry (name) order."""
    registry = registry if registry is not None else get_registry()
    entries = [registry.get("metric", name) for name in registry.names("metric")]
    return [entry for entry in entries if entry.cls.applies(capabilities)]


def headline_keys(capabilities: Capabilities, registry: Registry | None = None) -> list[str]:
    """The headline keys of the metrics that apply to a model with these capabilities, in metric order, each once.

    A metric may leave a headline key out for a given model (an autoencoder has no neg_elbo_nats): print those
    present in evaluate's output."""
    keys: dict[str, None] = {}
    for entry in applicable_metrics(capabilities, registry):
        keys.update(dict.fromkeys(entry.cls.headline))
    return list(keys)


def param_keys(registry: Registry | None = None) -> set[str]:
    """Keys of evaluate's output that are counts or settings (MLflow params, not metrics): `examples`, `dims`
    and every registered metric's `params`."""
    registry = registry if registry is not None else get_registry()
    return set(COMMON_KEYS).union(*(registry.get("metric", n).cls.params for n in registry.names("metric")))


@torch.no_grad()
def evaluate(model: Model, images: torch.Tensor, cfg: EvalConfig, factors: torch.Tensor | None = None,
             factor_names=(), factor_discrete=(), registry: Registry | None = None) -> dict:
    """Every registered metric (family "metric") whose needs the model's capabilities meet, over a test split
    (N, C, H, W) in [0, 1] and its known `factors` (N, K), if any: {"examples", "dims", then each metric's keys}.

    The split is cut to cfg.max_examples. Metrics run in registry (name) order, in eval mode, under no_grad, each
    after torch.manual_seed(cfg.seed), so that a metric's numbers do not depend on which others ran; the global
    torch RNG state and the model's mode are restored afterwards. A key returned by two metrics is an error."""
    was_training = model.training
    model.eval()
    gen_state = torch.get_rng_state()
    try:
        if cfg.max_examples is not None:
            images = images[: cfg.max_examples]
        n, dims = len(images), images[0].numel()
        if factors is not None:
            factors = factors[:n]  # (N, K)
        ctx = MetricContext(model, images, cfg, factors, tuple(factor_names), tuple(factor_discrete))
        out: dict = {"examples": n, "dims": dims}
        owner = dict.fromkeys(out, "evaluate")  # key -> who returned it, for the clash message
        for entry in applicable_metrics(model.capabilities, registry):
            torch.manual_seed(cfg.seed)
            result = entry.cls().compute(ctx)
            if not isinstance(result, dict):
                raise PluginError(f"metric {entry.name!r} ({entry.source}) returned {type(result).__name__} from "
                                  f"compute, expected a dict of {{key: number or list}}")
            clash = sorted(set(result) & set(out))
            if clash:
                raise PluginError(f"metric {entry.name!r} ({entry.source}) returns {clash}, already returned by "
                                  f"{', '.join(sorted({owner[k] for k in clash}))}; give the metric's keys a prefix "
                                  f"of its own")
            out.update(result)
            owner.update(dict.fromkeys(result, f"metric {entry.name!r}"))
        return out
    finally:
        torch.set_rng_state(gen_state)
        model.train(was_training)


def evaluate_vq(model: Model, images: torch.Tensor, cfg: EvalConfig) -> dict:
    """evaluate() of a model with code grids, without factors (kept for callers of the former VQ-only function)."""
    return evaluate(model, images, cfg)
