"""Model kinds regularised by the maximum mean discrepancy between the aggregate posterior q(z) and the prior p(z).

- info-vae: Zhao, Song & Ermon 2017, "InfoVAE: Information Maximizing Variational Autoencoders" (arXiv:1706.02262),
  eqs. 7-8 with D = MMD: loss = -log p(x|z) + (1 - alpha) KL(q(z|x) || p(z)) + (alpha + lambda - 1) MMD(q(z), p(z)),
  z ~ q(z|x) by reparameterization (a VAE; its ELBO, IWAE bound and samples stay those of the VAE);
- wae-mmd: Tolstikhin, Bousquet, Gelly & Schoelkopf 2018, "Wasserstein Auto-Encoders" (arXiv:1711.01558),
  Algorithm 2 with the deterministic encoder of its experiments (sec. 4), z = Q(x) (an AE),
  loss = -log p(x|z) + lambda MMD(q(z), p(z)).

MMD^2 is the unbiased estimate (two U-statistics and a sample average) of Gretton et al. 2012 (JMLR, "A Kernel
Two-Sample Test", Lemma 6, eq. 3) between the batch's codes z_1..z_n and n draws from model.prior.sample (the
standard normal unless model.prior says otherwise), as in Algorithm 2. Kernels (WAE sec. 4): inverse
multiquadratics k(x, y) = C / (C + ||x - y||^2) and the Gaussian k(x, y) = exp(-||x - y||^2 / C), both with
C = 2 J sigma_z^2 for a prior of variance sigma_z^2 (`kernel_scale`).

The MMD is a batch statistic (not a per-image sum like the reconstruction), so its weight carries the scale:
info-vae's default lambda = 1000 lets an MMD of order 1e-2 count against a reconstruction of hundreds of nats per
image; wae-mmd's default lambda = 10 is the paper's MNIST setting (their cost was a squared distance, not -log p(x|z)).
In info-vae, (1 - alpha) and (alpha + lambda - 1) are Objective weights on the kl and mmd terms, and train.beta's
schedule multiplies the kl term as for the plain VAE: the kl term enters as (1 - alpha) * beta(t) * KL.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Capabilities, Objective
from vaeflow.plugins.models import AE, VAE, ContinuousOptions

Kernel = Literal["imq", "rbf"]


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 between the rows of x (N, J) and y (M, J), by differences (exact at 0): (N, M)."""
    return (x.unsqueeze(1) - y.unsqueeze(0)).pow(2).sum(-1)  # (N, M, J) -> (N, M)


def kernel_matrix(x: torch.Tensor, y: torch.Tensor, kernel: Kernel = "imq", scale: float = 1.0) -> torch.Tensor:
    """k(x_i, y_j), C = 2 J scale: IMQ C / (C + d^2) or RBF exp(-d^2 / C) (Tolstikhin et al. 2018, sec. 4): (N, M)."""
    c = 2.0 * x.shape[-1] * scale
    d2 = squared_distances(x, y)  # (N, M)
    if kernel == "imq":
        return c / (c + d2)
    if kernel == "rbf":
        return torch.exp(-d2 / c)
    raise ValueError(f"unknown kernel {kernel!r}; expected 'imq' or 'rbf'")


def mmd(x: torch.Tensor, y: torch.Tensor, kernel: Kernel = "imq", scale: float = 1.0) -> torch.Tensor:
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6, eq. 3) of samples x (N, J) and y (M, J), N, M >= 2: a scalar ().

    sum_{i != j} k(x_i, x_j) / (N (N-1)) + sum_{i != j} k(y_i, y_j) / (M (M-1)) - 2 sum_{i, j} k(x_i, y_j) / (N M).
    """
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 points on each side, got {n} and {m}")
    k_xx, k_yy = kernel_matrix(x, x, kernel, scale), kernel_matrix(y, y, kernel, scale)  # (N, N), (M, M)
    k_xy = kernel_matrix(x, y, kernel, scale)  # (N, M)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))  # ()
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))  # ()
    return within_x + within_y - 2.0 * k_xy.mean()  # ()


class MMDOptions(ContinuousOptions):
    """The kernel of the MMD between q(z) and p(z)."""

    kernel: Kernel = Field("imq", description="the MMD's kernel: imq (inverse multiquadratics, the WAE paper's choice) "
                                              "or rbf (Gaussian)")
    kernel_scale: float = Field(1.0, gt=0, description="sigma_z^2, the prior's variance: the kernel's C = 2 J "
                                                       "sigma_z^2 (WAE sec. 4); 1 for the standard normal")


class MMDRegularised:
    """The shared part of the MMD kinds (mixed into VAE or AE): reconstruction, KL for a variational posterior, and
    MMD(q(z), p(z)); a subclass gives `term_weights`."""

    @classmethod
    def build(cls, options, make, shape, config):
        """The base kind's components; the options (weights, kernel) kept for the objective."""
        model = super().build(options, make, shape, config)
        model.options = options
        return model

    def prior_mmd(self, z: torch.Tensor) -> torch.Tensor:
        """Unbiased MMD^2 between codes z (B, J) and B draws of model.prior (global RNG), on z's device: ()."""
        if z.shape[0] < 2:  # a batch of one has no unbiased estimate; it contributes nothing (kept in the graph)
            return z.sum() * 0.0
        target = self.prior.sample(z.shape[0]).to(z.device, torch.float32)  # (B, J)
        return mmd(z.float(), target, self.options.kernel, self.options.kernel_scale)

    def forward(self, x: torch.Tensor) -> Objective:
        """Encode, draw z (the code itself for a point posterior), decode, and add the MMD of the batch's codes."""
        terms, _, z = self.elbo_pass(x)  # reconstruction (and kl); z (B, J)
        terms["mmd"] = self.prior_mmd(z)
        return Objective(terms, weights=self.term_weights())


class InfoVAEOptions(MMDOptions):
    """InfoVAE's alpha and lambda (Zhao et al. 2017, eq. 8)."""

    alpha: float = Field(0.0, le=1.0, description="alpha: the KL term's weight is 1 - alpha (0 keeps the ELBO's KL; "
                                                   "1 drops it); above 1 the KL would be rewarded")
    lambda_: float = Field(1000.0, gt=0, description="lambda (> 0): the MMD term's weight is alpha + lambda - 1")

    @model_validator(mode="after")
    def _mmd_weight_not_negative(self):
        if self.alpha + self.lambda_ - 1 < 0:
            raise ValueError(f"alpha + lambda_ - 1 = {self.alpha + self.lambda_ - 1:g} is the MMD's weight and must "
                             f"be >= 0 (a negative weight rewards q(z) for leaving p(z)); raise lambda_ to at least "
                             f"{1 - self.alpha:g}")
        return self


class InfoVAE(MMDRegularised, VAE):
    """InfoVAE with the MMD divergence: -log p(x|z) + (1 - alpha) KL + (alpha + lambda - 1) MMD (Zhao et al. 2017)."""

    name = "info-vae"
    Options = InfoVAEOptions
    capabilities = Capabilities(continuous=True, sampling=True, log_likelihood="bound")
    scheduled = "kl"

    def term_weights(self) -> dict[str, float]:
        """{kl: 1 - alpha, mmd: alpha + lambda - 1} (eq. 8)."""
        alpha = self.options.alpha
        return {"kl": 1.0 - alpha, "mmd": alpha + self.options.lambda_ - 1.0}


class WAEMMDOptions(MMDOptions):
    """WAE-MMD's lambda (Tolstikhin et al. 2018, Algorithm 2)."""

    mmd_weight: float = Field(10.0, ge=0, description="lambda, the MMD term's weight (10: the paper's MNIST setting)")


class WAEMMD(MMDRegularised, AE):
    """WAE-MMD: a deterministic encoder, -log p(x|z) + lambda MMD(q(z), p(z)) (Tolstikhin et al. 2018, Algorithm 2)."""

    name = "wae-mmd"
    Options = WAEMMDOptions
    capabilities = Capabilities(continuous=True, sampling=True, log_likelihood=None)
    scheduled = None

    def term_weights(self) -> dict[str, float]:
        """{mmd: lambda}."""
        return {"mmd": self.options.mmd_weight}


@hookimpl
def register_models(register):
    """Register the MMD-regularised kinds."""
    for cls in (InfoVAE, WAEMMD):
        register(cls)
