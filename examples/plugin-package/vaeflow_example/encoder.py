"""A residual MLP encoder for vaeflow, shipped as its own pip package.

Installing this distribution puts the module in the ``vaeflow`` entry-point
group (see pyproject.toml); vaeflow imports it, calls ``register_encoders``,
and configs can then say ``model.encoder: {name: residual-mlp, width: 256}``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_WIDTH
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Encoder, Options, Shape


class ResidualBlock(nn.Module):
    """h + W2 silu(W1 LayerNorm(h)): a pre-norm residual block (He et al. 2016) that starts as the identity."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)  # zero residual branch: each block is the identity at init
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, width) -> (B, width)."""
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h))))


class ResidualMLPEncoder(Encoder):
    """Flatten, project to `width`, `depth` residual blocks, then LayerNorm and a linear head."""

    name = "residual-mlp"

    class Options(Options):
        width: int = Field(
            256, gt=0, le=MAX_WIDTH, description="hidden width of the input projection and every residual block")
        depth: int = Field(2, ge=1, le=64, description="number of residual blocks")

    def __init__(self, options: Options, in_shape: Shape, out_features: int):
        super().__init__(options, in_shape, out_features)
        self.stem = nn.Linear(math.prod(in_shape), options.width)
        self.res_blocks = nn.Sequential(*(ResidualBlock(options.width) for _ in range(options.depth)))
        self.head = nn.Sequential(nn.LayerNorm(options.width), nn.Linear(options.width, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, out_features)."""
        h = self.stem(x.flatten(1))  # (B, C*H*W) -> (B, width)
        return self.head(self.res_blocks(h))  # (B, width) -> (B, out_features)


@hookimpl
def register_encoders(register):
    """Add `residual-mlp` to vaeflow's encoders."""
    register(ResidualMLPEncoder)
