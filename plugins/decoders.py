"""Built-in decoders: z (B, J) -> likelihood parameters (B, P, H, W)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, PositiveInt
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Decoder, Options, Shape
from plugins.layers import Activation, activation, conv_grid, mlp


class MLPDecoder(Decoder):
    """Fully connected layers, then reshape to the parameter grid (Kingma & Welling 2014)."""

    name = "mlp"

    class Options(Options):
        hidden: list[PositiveInt] = Field([400], description="hidden layer widths, e.g. [400] for J-400-784")
        activation: Activation = Field("relu", description="nonlinearity between layers")

    def __init__(self, options: Options, latent_dim: int, out_shape: Shape):
        super().__init__(options, latent_dim, out_shape)
        self.net = mlp([latent_dim, *options.hidden, math.prod(out_shape)], options.activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, J) -> (B, P, H, W)."""
        return self.net(z).view(-1, *self.out_shape)  # (B, P*H*W) -> (B, P, H, W)


class ConvDecoder(Decoder):
    """A linear layer to a coarse grid, then stride-2 4x4 transposed convolutions doubling it."""

    name = "conv"

    class Options(Options):
        channels: list[PositiveInt] = Field([64, 32], min_length=1, description="channels per stride-2 stage, coarse to fine")
        hidden: int = Field(256, gt=0, description="width of the linear layer before the convolutions")
        activation: Activation = Field("relu", description="nonlinearity")

    def __init__(self, options: Options, latent_dim: int, out_shape: Shape):
        super().__init__(options, latent_dim, out_shape)
        self.grid = conv_grid(out_shape, len(options.channels), "the conv decoder")  # (h, w)
        c0 = options.channels[0]
        self.head = nn.Sequential(
            nn.Linear(latent_dim, options.hidden), activation(options.activation),
            nn.Linear(options.hidden, c0 * self.grid[0] * self.grid[1]), activation(options.activation),
        )
        layers: list[nn.Module] = []
        for c_in, c_out in zip(options.channels, options.channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), activation(options.activation)]
        layers.append(nn.ConvTranspose2d(options.channels[-1], out_shape[0], 4, stride=2, padding=1))
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, J) -> (B, P, H, W)."""
        h = self.head(z).view(-1, self.options.channels[0], *self.grid)  # (B, c0, h, w)
        return self.upsample(h)  # (B, P, H, W)


@hookimpl
def register_decoders(register):
    """Register the built-in decoders."""
    register(MLPDecoder)
    register(ConvDecoder)
