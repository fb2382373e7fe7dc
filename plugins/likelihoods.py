"""Built-in likelihoods p(x | z): log_prob returns log-densities (higher is better), summed over pixels.

The seed notes drop the minus sign of the Gaussian term; the correct form is
log N(x; mu, sigma^2) = -1/2 ((x - mu) / sigma)^2 - log sigma - 1/2 log 2 pi.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Likelihood, Options, Shape

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _BernoulliLogProb(torch.autograd.Function):
    """sum_pixels x l - softplus(l) with a hand-written backward, d/dl = x - sigmoid(l) and d/dx = l.

    The autograd graph of the plain expression keeps x * l and softplus(l) and makes four passes over the logits
    backward; this makes two forward (softplus, then one addcmul in place) and three backward, and broadcasts x
    over leading sample dimensions of l instead of copying it. (x l - softplus(l) itself equals
    -BCE-with-logits, and softplus vectorizes better on CPU than log_sigmoid.)
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        ctx.pixel_dims = x.dim() - 1
        l = logits.to(torch.promote_types(x.dtype, logits.dtype))  # bf16 logits under autocast: score in float32
        per_pixel = F.softplus(l).addcmul_(x, l, value=-1.0)  # (..., B, C, H, W): softplus(l) - x l
        return per_pixel.flatten(-ctx.pixel_dims).sum(-1).neg_()  # (..., B)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, x = ctx.saved_tensors
        g = grad.reshape(*grad.shape, *[1] * ctx.pixel_dims)  # (..., B, 1, 1, 1)
        l = logits.to(grad.dtype)
        grad_logits = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.sigmoid(l).sub_(x).mul_(g.neg()).to(logits.dtype)  # (x - sigmoid(l)) g
        if ctx.needs_input_grad[1]:
            grad_x = l * g  # (..., B, C, H, W), summed back to x's shape over the sample dimensions
            grad_x = grad_x.sum(tuple(range(grad_x.dim() - x.dim()))) if grad_x.dim() > x.dim() else grad_x
        return grad_logits, grad_x


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x; sigmoid(l)) summed over pixels: x (B, C, H, W) in [0, 1], logits (..., B, C, H, W) -> (..., B)."""
    return _BernoulliLogProb.apply(logits, x)


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels with logits l: log p(x|l) = sum x l - softplus(l), for x in [0, 1]."""

    name = "bernoulli"

    class Options(Options):
        pass

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1], logits (B, C, H, W) -> (B,), by the fused bernoulli_log_prob."""
        return bernoulli_log_prob(x, params)

    def log_prob_samples(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) broadcast against k sets of logits (k, B, C, H, W) -> (k, B), with no copy of x."""
        return bernoulli_log_prob(x, params)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """sigmoid(logits): (B, C, H, W)."""
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ Bernoulli(sigmoid(logits)): (B, C, H, W)."""
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float) -> torch.Tensor:
    """sum over pixels of log N(x; mean, sigma^2) = -((x-mean)/sigma)^2/2 - log sigma - log(2 pi)/2: -> (B,)."""
    if isinstance(log_sigma, float):
        sq = (x - mean).pow(2).flatten(1).sum(1) * (0.5 * math.exp(-2 * log_sigma))  # (B,)
        return -sq - x[0].numel() * (log_sigma + HALF_LOG_2PI)
    z = (x - mean) * torch.exp(-log_sigma)  # (B, C, H, W)
    return -(0.5 * z.pow(2) + log_sigma + HALF_LOG_2PI).flatten(1).sum(1)


class Gaussian(Likelihood):
    """Gaussian pixels with a fixed sigma; the decoder outputs the mean."""

    name = "gaussian"

    class Options(Options):
        sigma: float = Field(0.1, gt=0, description="fixed standard deviation of every pixel")

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x, mean (B, C, H, W) -> (B,)."""
        return gaussian_log_prob(x, params, math.log(self.options.sigma))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The decoder output itself: (B, C, H, W)."""
        return params

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + sigma * eps: (B, C, H, W)."""
        eps = torch.randn(params.shape, generator=generator, device=params.device, dtype=params.dtype)
        return params + self.options.sigma * eps


class GaussianLearned(Likelihood):
    """Gaussian pixels with a learned sigma: one per pixel (decoder output) or one shared parameter."""

    name = "gaussian-learned"

    class Options(Options):
        sigma: Literal["per-pixel", "shared"] = Field(
            "shared", description="per-pixel: the decoder outputs log sigma per pixel; shared: one learned log sigma"
        )
        init_sigma: float = Field(0.1, gt=0, description="initial sigma of the shared parameter")
        min_sigma: float = Field(1e-3, gt=0, description="lower bound on sigma, for stability")

    def __init__(self, options: Options, data_shape: Shape):
        super().__init__(options, data_shape)
        if options.sigma == "shared":
            if options.init_sigma <= options.min_sigma:
                raise ValueError(f"init_sigma ({options.init_sigma}) must exceed min_sigma ({options.min_sigma})")
            # inverse of the bound in _split, so the effective sigma starts at init_sigma exactly
            gap = math.log(options.init_sigma) - math.log(options.min_sigma)
            raw = math.log(options.min_sigma) + gap + math.log(-math.expm1(-gap))  # floor + softplus^-1(gap)
            self.log_sigma = nn.Parameter(torch.tensor(raw))

    def param_channels(self, channels: int) -> int:
        """Mean and log sigma per channel when per-pixel, else just the mean."""
        return 2 * channels if self.options.sigma == "per-pixel" else channels

    def _split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.options.sigma == "per-pixel":
            mean, log_sigma = params.chunk(2, dim=1)  # (B, C, H, W) each
        else:
            mean, log_sigma = params, self.log_sigma  # (B, C, H, W), ()
        floor = math.log(self.options.min_sigma)
        return mean, floor + F.softplus(log_sigma - floor)  # smooth lower bound

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), params (B, P, H, W) -> (B,)."""
        mean, log_sigma = self._split(params)
        return gaussian_log_prob(x, mean, log_sigma)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The mean channels: (B, C, H, W)."""
        return self._split(params)[0]

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + sigma * eps: (B, C, H, W)."""
        mean, log_sigma = self._split(params)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + log_sigma.exp() * eps


@hookimpl
def register_likelihoods(register):
    """Register the built-in likelihoods."""
    for cls in (Bernoulli, Gaussian, GaussianLearned):
        register(cls)
