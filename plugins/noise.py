"""Built-in input corruptions for the denoising autoencoder (Vincent et al. 2008)."""

from __future__ import annotations

import torch
from pydantic import Field

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Noise, Options


class GaussianNoise(Noise):
    """x + sigma * eps, optionally clipped back to [0, 1]."""

    name = "gaussian"

    class Options(Options):
        std: float = Field(0.3, gt=0, description="standard deviation of the additive noise")
        clip: bool = Field(True, description="clip the result to [0, 1]")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        out = x + self.options.std * torch.randn_like(x)
        return out.clamp_(0.0, 1.0) if self.options.clip else out


class MaskingNoise(Noise):
    """Set each pixel to zero with probability p (masking noise)."""

    name = "masking"

    class Options(Options):
        p: float = Field(0.25, ge=0, lt=1, description="probability of zeroing a pixel")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x * (torch.rand_like(x) >= self.options.p)


class SaltPepperNoise(Noise):
    """Set each pixel to 0 or 1 (equally likely) with probability p."""

    name = "salt-pepper"

    class Options(Options):
        p: float = Field(0.1, ge=0, le=1, description="probability of corrupting a pixel")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        hit = torch.rand_like(x) < self.options.p
        salt = (torch.rand_like(x) < 0.5).to(x.dtype)
        return torch.where(hit, salt, x)


@hookimpl
def register_noises(register):
    """Register the built-in corruptions."""
    for cls in (GaussianNoise, MaskingNoise, SaltPepperNoise):
        register(cls)
