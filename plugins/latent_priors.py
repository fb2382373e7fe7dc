"""Built-in continuous priors p(z): the standard normal of Kingma & Welling 2014.

A VampPrior (Tomczak & Welling 2018) or a mixture registers the same way, through `register_latent_priors`.
"""

from __future__ import annotations

import torch

from vaeflow.core.distributions import DiagonalGaussian, standard_normal_log_prob
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import LatentPrior, Options


class StandardNormal(LatentPrior):
    """p(z) = N(0, I): KL in closed form against a diagonal Gaussian posterior (Kingma & Welling 2014, app. B)."""

    name = "standard-normal"

    class Options(Options):
        pass

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I): (..., J) -> (...)."""
        return standard_normal_log_prob(z)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """z ~ N(0, T^2 I) drawn on the CPU from `generator`: (n, J)."""
        return temperature * torch.randn(n, self.latent_dim, generator=generator)  # (n, J)

    def kl(self, posterior, z: torch.Tensor) -> torch.Tensor:
        """Closed form for a diagonal Gaussian q (1/2 sum_j mu^2 + sigma^2 - 1 - log sigma^2), else Monte Carlo: (B,)."""
        if isinstance(posterior, DiagonalGaussian):
            return posterior.kl()
        return super().kl(posterior, z)

    def kl_per_dim(self, posterior) -> torch.Tensor | None:
        """KL per dimension (B, J) for a diagonal Gaussian q."""
        return posterior.kl_per_dim() if isinstance(posterior, DiagonalGaussian) else None


@hookimpl
def register_latent_priors(register):
    """Register the built-in continuous priors."""
    register(StandardNormal)
