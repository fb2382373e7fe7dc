"""A diagonal Gaussian prior with a learned mean and scale, p(z) = N(mu, diag(sigma^2)), with its KL against a
diagonal Gaussian posterior in closed form (the two-Gaussian case of Kingma & Welling 2014, appendix B)."""
import math

import torch
from torch import nn

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import LatentPrior, Options


class LearnedGaussian(LatentPrior):
    """mu and log sigma (J,) are trained with the model; they start at N(0, I)."""

    name = "learned-gaussian"

    class Options(Options):
        pass

    def __init__(self, options, latent_dim):
        super().__init__(options, latent_dim)
        self.mu, self.log_sigma = nn.Parameter(torch.zeros(latent_dim)), nn.Parameter(torch.zeros(latent_dim))

    def log_prob(self, z):
        u = (z - self.mu) / self.log_sigma.exp()  # (..., J)
        return -(0.5 * u.pow(2) + self.log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1)  # (...)

    def sample(self, n, generator=None, temperature=1.0):
        eps = torch.randn(n, self.latent_dim, generator=generator).to(self.mu)  # (n, J)
        return self.mu + temperature * self.log_sigma.exp() * eps

    def kl_per_dim(self, q):
        """log sigma_p / sigma_q + (sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2: (B, J)."""
        return (self.log_sigma - 0.5 * q.logvar
                + (q.var + (q.mean - self.mu).pow(2)) / (2 * (2 * self.log_sigma).exp()) - 0.5)

    def kl(self, q, z):
        return self.kl_per_dim(q).sum(1)  # (B,)


@hookimpl
def register_latent_priors(register):
    register(LearnedGaussian)
