"""Laplace pixels with a fixed scale b: log p(x | mu) = sum over pixels of -|x - mu| / b - log 2b (an L1 loss)."""
import math

import torch
from pydantic import Field

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Likelihood, Options


class Laplace(Likelihood):
    """The decoder outputs the location mu (B, C, H, W)."""

    name = "laplace"

    class Options(Options):
        scale: float = Field(0.1, gt=0, description="b, the fixed scale of every pixel")

    def log_prob(self, x, params):
        b = self.options.scale
        return (-(x - params).abs() / b - math.log(2 * b)).flatten(1).sum(1)  # (B,)

    def mean(self, params):
        return params

    def sample(self, params, generator=None):
        u = torch.rand(params.shape, generator=generator).to(params) - 0.5  # (B, C, H, W) in [-1/2, 1/2)
        return params - self.options.scale * u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF


@hookimpl
def register_likelihoods(register):
    register(Laplace)
