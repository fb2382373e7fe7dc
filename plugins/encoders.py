"""Built-in encoders: x (B, C, H, W) -> posterior parameters (B, out_features), or a feature map for VQ models."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_DEPTH, MAX_WIDTH, Width
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Encoder, GridEncoder, Options, Shape
from vaeflow.plugins.layers import Activation, activation, conv_grid, mlp, residual_stack, stride_stages


class MLPEncoder(Encoder):
    """Flatten, then fully connected layers (Kingma & Welling 2014, appendix C)."""

    name = "mlp"

    class Options(Options):
        hidden: list[Width] = Field([400], description="hidden layer widths, e.g. [400] for 784-400-J")
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
        channels: list[Width] = Field([32, 64], min_length=1, description="output channels per stride-2 stage")
        hidden: int = Field(256, gt=0, le=MAX_WIDTH, description="width of the linear layer after the convolutions")
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


class VQVAEEncoder(GridEncoder):
    """The VQ-VAE / VQ-VAE-2 encoder: stride-2 4x4 convolutions, a 3x3 convolution, residual blocks.

    For stride 4 (the VQ-VAE-2 bottom level) that is C -> c/2 -> c then 3x3 c -> c; for stride 2
    (the top level, applied to the bottom features) C -> c/2 then 3x3 c/2 -> c (Razavi et al. 2019).
    """

    name = "vqvae-conv"

    class Options(Options):
        residual_blocks: int = Field(2, ge=0, le=MAX_DEPTH, description="residual blocks after the convolutions")
        residual_channels: int = Field(32, gt=0, le=MAX_WIDTH, description="hidden width of each residual block")
        activation: Activation = Field("relu", description="nonlinearity")

    def __init__(self, options: Options, in_shape: Shape, out_channels: int, stride: int):
        super().__init__(options, in_shape, out_channels, stride)
        n_down = stride_stages(stride, "the vqvae-conv encoder")
        conv_grid(in_shape, n_down, f"the vqvae-conv encoder at stride {stride}")
        widths = [in_shape[0]] + [max(1, out_channels // 2)] + [out_channels] * (n_down - 1)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(options.activation)]
        layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers, residual_stack(out_channels, options.residual_blocks,
                                                         options.residual_channels, options.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, out_channels, H / stride, W / stride)."""
        return self.net(x)


@hookimpl
def register_encoders(register):
    """Register the built-in encoders."""
    register(MLPEncoder)
    register(ConvEncoder)
    register(VQVAEEncoder)
