"""The importance weighted autoencoder as a model kind (`model.kind: iwae`).

Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (ICLR 2016, arXiv:1509.00519). The same
networks as the VAE, trained on the k-sample importance weighted bound (sec. 3, eq. 8; arXiv v4 numbering):

    L_k(x) = E_{z_1..z_k ~ q(z|x)} [ log (1/k) sum_i w_i ],   w_i = p(x, z_i) / q(z_i|x) = p(x|z_i) p(z_i) / q(z_i|x),

with the z_i drawn by reparameterization (VAE.log_weights), so its gradient flows through the draws as in sec. 3.1.
L_1 is the ELBO, and log p(x) >= L_{k+1} >= L_k (Theorem 1): more samples, a tighter bound. The training loss is
-L_k in nats per image. Evaluation is the VAE's (ELBO, and the IWAE bound with eval.iwae_k samples): this kind
only changes what training maximizes.

There is no KL term for train.beta to weight: beta has no meaning in L_k (`scheduled = None`), so any train.beta
other than the constant 1 is a config error (vaeflow.core.model). The Monte Carlo ELBO of the same draws, the mean of
log w_i, is logged as the detached stat `neg_elbo`, so the gap L_k - ELBO is visible during training.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Objective, Shape
from vaeflow.plugins.models import VAE, ContinuousOptions


class IWAEOptions(ContinuousOptions):
    """Options of an IWAE: the VAE's, plus the number of importance samples."""

    samples: int = Field(5, ge=1, le=5000, description="k, importance samples per image in the training bound L_k "
                                                       "(k decodes per image per step; 1 gives the ELBO, 5 and 50 as "
                                                       "in the paper's experiments)")


class IWAE(VAE):
    """A VAE trained on the importance weighted bound L_k (Burda et al. 2016, eq. 8) instead of the ELBO."""

    name = "iwae"
    Options = IWAEOptions
    scheduled = None  # L_k has no separate KL term, so train.beta has nothing to weight

    @classmethod
    def build(cls, options, make, shape: Shape, config) -> "IWAE":
        """The VAE's components, plus k from model.samples."""
        model = super().build(options, make, shape, config)
        model.samples = options.samples
        return model

    def forward(self, x: torch.Tensor) -> Objective:
        """-L_k per image (nats), averaged over the batch x (B, C, H, W); the ELBO of the same draws as a stat."""
        log_w = self.log_weights(x, self.samples)  # (k, B), with gradients through the reparameterized draws
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.samples)  # (B,) log (1/k) sum_i w_i
        return Objective({"iwae": -bound.mean()}, stats={"neg_elbo": -log_w.detach().mean()})


@hookimpl
def register_models(register):
    """Add the `iwae` model kind."""
    register(IWAE)
