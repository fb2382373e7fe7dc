"""The regularized autoencoder (RAE) as a vaeflow model kind, shipped by a third-party package.

Ghosh et al. 2020, "From Variational to Deterministic Autoencoders" (ICLR 2020, arXiv:1903.12436), eq. 11:

    L_RAE = L_REC + beta * L_Z + lambda * L_REG,   L_Z = 1/2 ||z||^2,   L_REG = ||theta_decoder||^2 (RAE-L2)

with a deterministic encoder z = E(x): no posterior noise, no KL. L_REC is vaeflow's -log p(x|z) under the
configured likelihood (a Gaussian likelihood gives the paper's squared error up to scale). New images decode
z drawn from the model's prior (model.prior, standard normal by default). In `vaeflow run`, the kind's `fit_gmm` stage
(gmm.py) then fits the paper's ex-post density estimate, a Gaussian mixture, to the training latents and makes it
model.prior (the `gmm` latent prior) of the model that the pipeline evaluates, renders and registers.

The model owns its objective: it returns three named terms with their weights, and the engine sums them and
logs each one. Configs select it with `model.kind: rae`; everything else (encoder, decoder, likelihood, prior)
is the same as for vaeflow's built-in `ae`, which this class builds on.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from vaeflow.core.bounds import MAX_GRID, MAX_LATENT, MAX_SEED, MAX_STEPS
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Capabilities, Objective, Options
from vaeflow.plugins.models import AE, ContinuousOptions


class ExPostOptions(Options):
    """The ex-post density estimate of the `fit_gmm` stage (gmm.py): a Gaussian mixture fitted by EM to the training
    latents after training, then the prior (model.prior) of the model the pipeline evaluates and registers. Declared
    here, not in gmm.py, so that the train key (which covers this module's code) stays clear of the GMM's code; the
    `watch_only` entry below keeps these values out of the train key too."""

    components: int = Field(
        10, ge=1, le=MAX_LATENT, description="K, the number of mixture components (the paper uses 10)")
    covariance: Literal["full", "diag"] = Field("full", description="each component's covariance: a full J x J "
                                                                     "matrix, or diagonal")
    iterations: int = Field(100, ge=0, le=MAX_STEPS, description="the most EM iterations after the k-means++ start")
    tolerance: float = Field(1e-6, ge=0, description="stop once an iteration raises the mean train log-likelihood "
                                                     "per latent (nats) by no more than this")
    regularization: float = Field(1e-6, ge=0, description="added to every covariance's diagonal in each M-step, so "
                                                          "that a component on few latents stays invertible")
    seed: int = Field(0, ge=-MAX_SEED, le=MAX_SEED, description="seeds the k-means++ start and the samples")
    samples: int = Field(64, ge=1, le=MAX_GRID, description="how many GMM samples to decode into samples.png")


class RAE(AE):
    """Regularized autoencoder (Ghosh et al. 2020): reconstruction + beta/2 ||z||^2 + lambda ||decoder weights||^2."""

    name = "rae"
    capabilities = Capabilities(continuous=True, sampling=True, log_likelihood=None)
    stages = ("fit_gmm",)  # after train: the ex-post GMM, made model.prior of the model the later stages use (gmm.py)
    watch_only = ("ex_post",)  # fitted after training: never changes the weights

    class Options(ContinuousOptions):
        latent_weight: float = Field(1e-2, ge=0, description="beta: the weight of 1/2 ||z||^2 per image (L_Z)")
        decoder_weight: float = Field(1e-6, ge=0, description="lambda: the weight of the decoder's squared L2 norm "
                                                             "(L_REG of RAE-L2)")
        ex_post: ExPostOptions = Field(default_factory=ExPostOptions, title="ex-post density estimation",
                                       description="the Gaussian mixture that the fit_gmm stage fits to the "
                                                   "training latents")

    @classmethod
    def build(cls, options, make, shape, config) -> "RAE":
        """The built-in autoencoder's components, plus this kind's two regularizer weights."""
        model = super().build(options, make, shape, config)
        model.latent_weight, model.decoder_weight = options.latent_weight, options.decoder_weight
        return model

    def forward(self, x: torch.Tensor) -> Objective:
        """The three terms of eq. 11 for a batch x (B, C, H, W), each a scalar."""
        z = self.encoder(x)  # (B, J): deterministic code
        log_px = self.likelihood.log_prob(x, self.decode(z))  # (B,)
        decoder_l2 = sum(p.pow(2).sum() for p in self.decoder.parameters())  # scalar
        terms = {"reconstruction": -log_px.mean(), "latent_norm": 0.5 * z.pow(2).sum(1).mean(),
                 "decoder_l2": decoder_l2}
        return Objective(terms, weights={"latent_norm": self.latent_weight, "decoder_l2": self.decoder_weight})


@hookimpl
def register_models(register):
    """Add the `rae` model kind."""
    register(RAE)
