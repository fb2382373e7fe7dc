"""Building blocks shared by the built-in encoders and decoders."""

from __future__ import annotations

from typing import Literal

from torch import nn

from core.interfaces import Shape

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
