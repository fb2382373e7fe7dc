"""Built-in decoders: z (B, J), or a feature map for VQ models, -> likelihood parameters (B, P, H, W)."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_DEPTH, MAX_WIDTH, Width
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Decoder, GridDecoder, Options, Shape
from vaeflow.plugins.layers import Activation, activation, conv_grid, mlp, residual_stack, stride_stages


class MLPDecoder(Decoder):
    """Fully connected layers, then reshape to the parameter grid (Kingma & Welling 2014)."""

    name = "mlp"

    class Options(Options):
        hidden: list[Width] = Field([400], description="hidden layer widths, e.g. [400] for J-400-784")
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
        channels: list[Width] = Field([64, 32], min_length=1, description="channels per stride-2 stage, coarse to fine")
        hidden: int = Field(256, gt=0, le=MAX_WIDTH, description="width of the linear layer before the convolutions")
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


class VQVAEDecoder(GridDecoder):
    """The VQ-VAE / VQ-VAE-2 decoder: a 3x3 convolution, residual blocks, stride-2 4x4 transposed convolutions."""

    name = "vqvae-conv"

    class Options(Options):
        channels: int = Field(128, gt=0, le=MAX_WIDTH, description="working width")
        residual_blocks: int = Field(2, ge=0, le=MAX_DEPTH, description="residual blocks before upsampling")
        residual_channels: int = Field(32, gt=0, le=MAX_WIDTH, description="hidden width of each residual block")
        activation: Activation = Field("relu", description="nonlinearity")

    def __init__(self, options: Options, in_channels: int, out_shape: Shape, stride: int):
        super().__init__(options, in_channels, out_shape, stride)
        n_up = stride_stages(stride, "the vqvae-conv decoder")
        conv_grid(out_shape, n_up, f"the vqvae-conv decoder at stride {stride}")
        c = options.channels
        widths = [c] * (n_up - 1) + [max(1, c // 2)] if n_up > 1 else [c]  # before each upsampling stage
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1),
                                   residual_stack(c, options.residual_blocks, options.residual_channels, options.activation)]
        for i, c_in in enumerate(widths):
            c_out = widths[i + 1] if i + 1 < len(widths) else out_shape[0]
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i + 1 < len(widths):
                layers.append(activation(options.activation))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, h, w) -> (B, P, h * stride, w * stride)."""
        return self.net(h)


@hookimpl
def register_decoders(register):
    """Register the built-in decoders."""
    register(MLPDecoder)
    register(ConvDecoder)
    register(VQVAEDecoder)
