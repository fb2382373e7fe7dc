"""Helpers for models with discrete code grids (capabilities.discrete): ancestral sampling from their code
priors and decoding. A discrete model names its levels in sampling order (`levels`), says which level
conditions each level's prior (`condition_of`), and decodes codes per level (`decode_codes`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from vaeflow.core.errors import ConfigError


@contextmanager
def eval_mode(module: nn.Module):
    """Eval mode inside the block, the previous mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.no_grad()
def sample_codes(model, priors: dict, n: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Ancestral sampling over the model's levels in order, each prior conditioned on the codes of the level the
    model names (the bottom on the top for VQ-VAE-2): {level: (n, h, w)}; same seed, same codes."""
    generator = torch.Generator().manual_seed(seed)
    codes: dict[str, torch.Tensor] = {}
    for level in model.levels:
        if level not in priors:
            break
        given = model.condition_of(level)
        codes[level] = priors[level].sample(n, codes[given] if given else None, temperature, top_k, generator)
    return codes


@torch.no_grad()
def sample_images(model, priors: dict, n: int, temperature: float = 1.0, top_k: int | None = None,
                  seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Codes from the priors, decoded to the likelihood mean: (n, C, H, W)."""
    missing = [level for level in model.levels if level not in priors]
    if missing:
        raise ConfigError([("prior", f"the {model.kind} needs a prior for every level; missing: {', '.join(missing)}")])
    codes = sample_codes(model, priors, n, temperature, top_k, seed)
    images = [model.likelihood.mean(model.decode_codes({k: v[i:i + batch_size] for k, v in codes.items()}))
              for i in range(0, n, batch_size)]
    return torch.cat(images)
