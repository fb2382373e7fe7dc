"""The `factor-vae` model kind: a VAE whose aggregate posterior q(z) is pushed to factorise by a discriminator.

Kim & Mnih 2018, "Disentangling by Factorising" (arXiv:1802.05983): eq. 2 (the objective: the ELBO minus
gamma * KL(q(z) || prod_j q(z_j)), the total correlation TC), eq. 3 (the density-ratio trick: TC ~ E_q(z)[log D(z) /
(1 - D(z))] for a discriminator D telling samples of q(z) from samples of prod_j q(z_j)), algorithm 1 (permute_dims:
each latent dimension shuffled across the batch by its own permutation, which keeps every marginal q(z_j) and
destroys the dependence between dimensions) and algorithm 2 (the VAE update on ELBO - gamma * TC, the
discriminator update on its cross-entropy -1/2 [mean log D(z) + mean log (1 - D(permute_dims(z')))]);
appendix A (the discriminator: 6 fully connected layers of 1000 units with leaky ReLU; Adam with lr 1e-4 and
betas (0.5, 0.9) for D).

The terms, as the engine sums them (`tc` weighted by gamma, `kl` by train.beta, 1 in the paper):

    reconstruction  -log p(x|z)                                 z ~ q(z|x), reparameterized, the whole batch
    kl              KL(q(z|x) || p(z))
    tc              mean_i log D(z_i) / (1 - D(z_i)) = mean_i s(z_i)      s the discriminator's logit, D = sigmoid(s),
                    computed with D's parameters detached: its gradient reaches the encoder only
    discriminator   1/2 [BCE(s(z_a), 1) + BCE(s(permute_dims(z_b)), 0)]   on z.detach(): reaches D only

z_a is the first half of the batch's z and z_b the second half (they share the middle row when B is odd); the
paper draws z_b from a second minibatch. D outputs one logit s instead of the paper's two softmax logits
(l_0, l_1): the same family of classifiers, with s = l_0 - l_1.

Where vaeflow's interface stops: the engine (vaeflow.core.engine) builds ONE optimizer over model.parameters() and takes
ONE step per batch on the weighted sum of Objective.terms, and a model can declare neither its own optimizer,
parameter groups or hyperparameters, nor a second update per step, nor a second minibatch. The gradients are
separated by construction (each parameter receives only its own objective's gradient), so one summed backward
and one step are algorithm 2's two updates taken together, with these differences from the paper:

- D shares the VAE's optimizer settings: train.lr, AdamW's betas (0.9, 0.999) and train.weight_decay, the lr
  schedule, and train.grad_clip, whose norm is taken over the VAE's and D's gradients together; the paper gives D
  Adam(lr 1e-4, betas (0.5, 0.9));
- D's real and permuted samples come from the two halves of one batch, not from two minibatches;
- the logged `loss` includes the discriminator's cross-entropy, which is not part of the VAE's objective.

Lifting the first would take a core change (a model hook returning parameter groups with their own lr and betas,
which make_optimizer would pass to AdamW); the rest is the paper's algorithm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vaeflow.core.bounds import Width
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Objective, Shape
from vaeflow.plugins.layers import Activation, mlp
from vaeflow.plugins.models import VAE, ContinuousOptions


class FactorVAEOptions(ContinuousOptions):
    """Options of a FactorVAE: the TC weight gamma and the discriminator's layers."""

    gamma: float = Field(10.0, ge=0, description="weight of the total-correlation term (Kim & Mnih 2018, eq. 2; "
                                                 "their dSprites sweep runs from 10 to 100); 0 gives the plain VAE "
                                                 "objective, with a discriminator trained beside it")
    discriminator_hidden: list[Width] = Field(
        default_factory=lambda: [1000] * 6, min_length=1,
        description="hidden widths of the discriminator's fully connected layers (the paper: 6 layers of 1000)")
    discriminator_activation: Activation = Field(
        "leaky_relu", description="activation between the discriminator's layers (the paper: leaky ReLU)")


# --- algorithm 1 and the discriminator's loss ----------------------------------------------------
def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: shuffle each latent dimension across the batch by its own random permutation: (B, J) -> (B, J).

    Draws from the global torch RNG; every column keeps its values (so each marginal q(z_j)) and loses its pairing
    with the other columns."""
    order = torch.rand(z.shape, device=z.device).argsort(dim=0)  # (B, J) one permutation per column
    return z.gather(0, order)


def halves(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch split for the discriminator: (first ceil(B/2) rows, last ceil(B/2) rows), sharing a row if B is odd."""
    b = z.shape[0]
    return z[: (b + 1) // 2], z[b // 2:]


def discriminator_loss(real_logits: torch.Tensor, permuted_logits: torch.Tensor) -> torch.Tensor:
    """Algorithm 2's cross-entropy -1/2 [mean log D(z) + mean log(1 - D(z~))], D = sigmoid(logit): (n,), (m,) -> ()."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    permuted = F.binary_cross_entropy_with_logits(permuted_logits, torch.zeros_like(permuted_logits))
    return 0.5 * (real + permuted)


# --- the model ---------------------------------------------------------------------------------
class FactorVAE(VAE):
    """A VAE trained on ELBO - gamma * TC, the total correlation estimated by a discriminator (Kim & Mnih 2018)."""

    name = "factor-vae"
    Options = FactorVAEOptions

    @classmethod
    def build(cls, options: FactorVAEOptions, make, shape: Shape, config) -> "FactorVAE":
        """The VAE's components, then the discriminator z (B, J) -> logit (B, 1) and gamma."""
        model = super().build(options, make, shape, config)
        sizes = [options.latent_dim, *options.discriminator_hidden, 1]
        model.discriminator = mlp(sizes, options.discriminator_activation)
        model.gamma = options.gamma
        return model

    def discriminator_logits(self, z: torch.Tensor) -> torch.Tensor:
        """s(z) = log D(z) / (1 - D(z)): z (B, J) -> (B,); gradients reach z and D's parameters."""
        return self.discriminator(z).squeeze(-1)

    def density_ratio(self, z: torch.Tensor) -> torch.Tensor:
        """s(z) with D's parameters detached (eq. 3): z (B, J) -> (B,); the gradient reaches z, never D."""
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, frozen, (z,)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> Objective:
        """The VAE's terms on z ~ q(z|x), the TC estimate through a frozen D, and D's cross-entropy on z.detach()."""
        terms, _, z = self.elbo_pass(x)  # reconstruction, kl; z (B, J)
        terms["tc"] = self.density_ratio(z).mean()
        z_a, z_b = halves(z.detach())  # (ceil(B/2), J) each
        real = self.discriminator_logits(z_a)  # (n,)
        permuted = self.discriminator_logits(permute_dims(z_b))  # (n,)
        terms["discriminator"] = discriminator_loss(real, permuted)
        right = (real > 0).sum() + (permuted < 0).sum()  # ()
        stats = {"discriminator_accuracy": (right / (len(real) + len(permuted))).detach()}
        return Objective(terms, weights={"tc": self.gamma}, stats=stats)


@hookimpl
def register_models(register):
    """Register the FactorVAE model kind: factor-vae."""
    register(FactorVAE)
