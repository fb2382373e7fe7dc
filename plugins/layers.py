"""Building blocks shared by the built-in encoders and decoders."""

from __future__ import annotations

from typing import Literal

import torch

from torch import nn

from vaeflow.core.interfaces import Shape

Activation = Literal["relu", "silu", "gelu", "leaky_relu", "elu"]
_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU}


def activation(name: Activation) -> nn.Module:
    """A fresh activation module by name."""
    return _ACTIVATIONS[name]()


def mlp(sizes: list[int], act: Activation) -> nn.Sequential:
    """Linear layers through `sizes`, with the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


def conv_grid(shape: Shape, n_down: int, who: str) -> tuple[int, int]:
    """(h, w) after n_down stride-2 stages; a ValueError says which sizes would work."""
    _, height, width = shape
    factor = 2**n_down
    if height % factor or width % factor:
        raise ValueError(
            f"{who} has {n_down} stride-2 stages, so image height and width must be multiples of {factor}; "
            f"got {height}x{width}. Use data.pad_to (e.g. {((max(height, width) + factor - 1) // factor) * factor}) "
            f"or fewer `channels` entries."
        )
    return height // factor, width // factor


class ResidualBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))), the VQ-VAE residual block (van den Oord et al. 2017)."""

    def __init__(self, channels: int, hidden: int, act: Activation = "relu"):
        super().__init__()
        self.net = nn.Sequential(
            activation(act), nn.Conv2d(channels, hidden, 3, padding=1),
            activation(act), nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return x + self.net(x)


def residual_stack(channels: int, blocks: int, hidden: int, act: Activation = "relu") -> nn.Sequential:
    """`blocks` residual blocks, then the activation (as in the VQ-VAE encoder and decoder)."""
    return nn.Sequential(*[ResidualBlock(channels, hidden, act) for _ in range(blocks)], activation(act))


def stride_stages(stride: int, who: str) -> int:
    """log2(stride) for a power-of-two stride >= 2; a ValueError otherwise."""
    if stride < 2 or stride & (stride - 1):
        raise ValueError(f"{who} needs a power-of-two stride >= 2 (2, 4, 8 ...), got {stride}")
    return stride.bit_length() - 1
