"""Posterior distributions q(z|x), in the style of diffusers' DiagonalGaussianDistribution."""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), from encoder output (B, 2J) split as [mean | logvar]."""

    def __init__(self, params: torch.Tensor):
        self.mean, logvar = params.chunk(2, dim=1)  # (B, J), (B, J)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)  # (B, J)
        self.var = self.std * self.std  # (B, J)

    def rsample(self, k: int | None = None) -> torch.Tensor:
        """Reparameterized draw z = mean + std * eps (Kingma & Welling 2014): (B, J), or (k, B, J)."""
        shape = self.mean.shape if k is None else (k, *self.mean.shape)
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mode (= mean): (B, J)."""
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension, closed form: (B, J)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 1/2 sum_j (mu^2 + sigma^2 - 1 - log sigma^2): (B,)."""
        return self.kl_per_dim().sum(dim=1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z (..., B, J) -> (..., B)."""
        return self.log_prob_per_dim(z).sum(dim=-1)

    def log_prob_per_dim(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z_j|x) per latent dimension, z broadcast against the (B, J) parameters: (..., B, J) -> (..., B, J)."""
        scaled = (z - self.mean) / self.std  # (..., B, J)
        return torch.addcmul(-0.5 * (self.logvar + LOG_2PI), scaled, scaled, value=-0.5)  # one pass over (..., B, J)


class PointPosterior:
    """A deterministic 'posterior' for the plain and denoising autoencoder: z = encoder(x)."""

    def __init__(self, params: torch.Tensor):
        self.mean = params  # (B, J)

    def rsample(self, k: int | None = None) -> torch.Tensor:
        """The code itself, (B, J), or repeated to (k, B, J)."""
        return self.mean if k is None else self.mean.expand(k, *self.mean.shape)

    def mode(self) -> torch.Tensor:
        """The code: (B, J)."""
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """No KL term for an autoencoder: zeros (B, J)."""
        return torch.zeros_like(self.mean)

    def kl(self) -> torch.Tensor:
        """No KL term for an autoencoder: zeros (B,)."""
        return self.mean.new_zeros(self.mean.shape[0])


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim: (..., J) -> (...)."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)
