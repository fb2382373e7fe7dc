"""The VampPrior: Tomczak & Welling 2018, "VAE with a VampPrior" (arXiv:1705.07120).

A "variational mixture of posteriors" (sec. 2.2, eq. 9): the model's own posterior at K learnable pseudo-inputs,

    p(z) = (1/K) sum_k q(z | u_k),    u_k (K, C, H, W) in the data space.

The pseudo-inputs are the outputs of a linear layer without bias on one-hot "idle" inputs e_k, through a hard-tanh
onto the [0, 1] pixel range: u_k = hardtanh(W e_k) = clamp(W[:, k], 0, 1), so the layer's weight W is stored as one
(K, C, H, W) parameter. As in the authors' code (jmtomczak/vae_vampprior), W starts at N(0.05, 0.01^2) (their MNIST
setting: near-black images inside (0, 1), where the hard-tanh passes gradients); K = 50 as in pythae (the paper
uses 500 on MNIST). The KL has no closed form: LatentPrior's one-sample Monte Carlo estimate log q(z|x) - log p(z)
at the reparameterized draw is used, as in the paper. Samples are reparameterized too, so an MMD against them
(info-vae, wae-mmd in plugins/mmd.py) also trains the pseudo-inputs; with a point posterior (ae, wae-mmd) the
components are point masses: sampling returns the pseudo-inputs' codes, and log_prob is an error.

The prior needs q(z|x) and the data shape, which a latent prior is not given at construction: the continuous model
binds it (`LatentPrior.bind`, called by VAE.__init__), and the pseudo-inputs are created then. The model is kept
as a plain attribute, not a submodule, so the encoder is saved once (under `encoder.`), `copy.deepcopy(model)` gives
a copy whose prior reads the copy's encoder, and `model.to(...)` moves the pseudo-inputs with everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vaeflow.core.bounds import MAX_IMAGES
from vaeflow.core.distributions import DiagonalGaussian
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import LatentPrior, Options


def unbound_error() -> RuntimeError:
    """What using a VampPrior that no model has bound raises."""
    return RuntimeError("vamp: the VampPrior is the model's posterior at learned pseudo-inputs, so it needs a model: "
                        "use it as model.prior of a continuous model (model.prior: {name: vamp}), or call "
                        "prior.bind(model) when constructing it by hand")


class VampPrior(LatentPrior):
    """p(z) = (1/K) sum_k q(z|u_k) over K learned pseudo-inputs u_k (Tomczak & Welling 2018, eq. 9)."""

    name = "vamp"

    class Options(Options):
        components: int = Field(
            50, gt=0, le=MAX_IMAGES, description="K, the number of pseudo-inputs (mixture components); "
                                                 "50 as in pythae, the paper uses 500 on MNIST")
        init_mean: float = Field(0.05, description="mean of the normal initialisation of the pseudo-inputs' weights "
                                                   "(before the [0, 1] hard-tanh); the authors' MNIST setting")
        init_std: float = Field(0.01, gt=0, description="standard deviation of that initialisation")

    def __init__(self, options: Options, latent_dim: int):
        super().__init__(options, latent_dim)
        self.register_parameter("idle_weight", None)  # W (K, C, H, W), created by bind() once the data shape is known

    # --- binding to the model ------------------------------------------------------------------
    def bind(self, model) -> None:
        """Keep `model` (outside the submodules) and create the pseudo-inputs' weights for its data shape."""
        shape = tuple(model.encoder.in_shape)  # (C, H, W)
        if model.latent_dim != self.latent_dim:
            raise ValueError(f"vamp: built for latent_dim={self.latent_dim}, bound to a model with "
                             f"latent_dim={model.latent_dim}")
        if self.idle_weight is None:
            k, o = self.options.components, self.options
            weight = torch.randn(k, *shape) * o.init_std + o.init_mean  # (K, C, H, W), global RNG as any init
            self.idle_weight = nn.Parameter(weight.to(model.device))
        elif tuple(self.idle_weight.shape[1:]) != shape:
            raise ValueError(f"vamp: pseudo-inputs of shape {tuple(self.idle_weight.shape[1:])} cannot serve a model "
                             f"of data shape {shape}")
        self.__dict__["_model"] = model  # a plain attribute: nn.Module.__setattr__ would register it as a submodule

    @property
    def model(self):
        """The bound continuous model; a clear error when the prior was never bound."""
        model = self.__dict__.get("_model")
        if model is None:
            raise unbound_error()
        return model

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """u_k = hardtanh(W e_k) on the [0, 1] pixel range: (K, C, H, W)."""
        if self.idle_weight is None:
            raise unbound_error()
        return F.hardtanh(self.idle_weight, 0.0, 1.0)  # (K, C, H, W)

    def components(self):
        """The mixture components q(z|u_k): a posterior over (K, J), a DiagonalGaussian for a variational model."""
        model = self.model  # raises the unbound error first
        return model.posterior(self.pseudo_inputs)

    # --- the prior -----------------------------------------------------------------------------
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log (1/K) sum_k q(z|u_k): (..., J) -> (...)."""
        q = self.components()  # over (K, J)
        if not isinstance(q, DiagonalGaussian):
            raise RuntimeError(f"vamp: the {self.model.kind} has a point posterior, so its VampPrior is a mixture of "
                               f"point masses without a density; use vamp with a variational kind for log p(z)")
        log_qk = q.log_prob(z.unsqueeze(-2))  # (..., 1, J) against (K, J) -> (..., K)
        return torch.logsumexp(log_qk, dim=-1) - math.log(log_qk.shape[-1])  # (...)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Pick u_k uniformly and draw z ~ q(z|u_k) with its std scaled by T; the component choices and the noise come
        from `generator` on the CPU, the result is on the prior's device: (n, J)."""
        q = self.components()  # over (K, J)
        k = torch.randint(q.mean.shape[0], (n,), generator=generator)  # (n,) component per draw, CPU
        eps = torch.randn(n, self.latent_dim, generator=generator)  # (n, J), CPU
        k, eps = k.to(q.mean.device), eps.to(q.mean.device, q.mean.dtype)
        std = getattr(q, "std", None)  # a point posterior has none: its components are point masses
        if std is None:
            return q.mean[k]  # (n, J)
        return q.mean[k] + temperature * std[k] * eps  # (n, J), reparameterized


@hookimpl
def register_latent_priors(register):
    """Register the VampPrior."""
    register(VampPrior)
