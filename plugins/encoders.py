"""Built-in encoders: x (B, C, H, W) -> posterior parameters (B, out_features)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, PositiveInt
from torch import nn

from core.hookspecs import hookimpl
from core.interfaces import Encoder, Options, Shape
from plugins.layers import Activation, activation, conv_grid, mlp


class MLPEncoder(Encoder):
    """Flatten, then fully connected layers (Kingma & Welling 2014, appendix C)."""

    name = "mlp"

    class Options(Options):
        hidden: list[PositiveInt] = Field([400], description="hidden layer widths, e.g. [400] for 784-400-J")
        activation: Activation = Field("relu", description="nonlinearity between layers")

    def __init__(self, options: Options, in_shape: Shape, out_features: int):
        super().__init__(options, in_shape, out_features)
        self.net = mlp([math.prod(in_shape), *options.hidden, out_features], options.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, out_features)."""
        return self.net(x.flatten(1))  # (B, C*H*W) -> (B, P)


class ConvEncoder(Encoder):
    """Stride-2 4x4 convolutions halving the grid per stage, then a linear head (DCGAN-style)."""

    name = "conv"

    class Options(Options):
        channels: list[PositiveInt] = Field([32, 64], min_length=1, description="output channels per stride-2 stage")
        hidden: int = Field(256, gt=0, description="width of the linear layer after the convolutions")
        activation: Activation = Field("relu", description="nonlinearity")

    def __init__(self, options: Options, in_shape: Shape, out_features: int):
        super().__init__(options, in_shape, out_features)
        h, w = conv_grid(in_shape, len(options.channels), "the conv encoder")
        layers: list[nn.Module] = []
        c_in = in_shape[0]
        for c_out in options.channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(options.activation)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * h * w, options.hidden), activation(options.activation),
            nn.Linear(options.hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, out_features)."""
        return self.head(self.features(x))  # (B, c, h, w) -> (B, P)


@hookimpl
def register_encoders(register):
    """Register the built-in encoders."""
    register(MLPEncoder)
    register(ConvEncoder)
