"""The beta-TCVAE as a model kind (`model.kind: beta-tcvae`): the VAE's KL split into three weighted terms.

Chen, Li, Grosse & Duvenaud 2018, "Isolating Sources of Disentanglement in Variational Autoencoders" (NeurIPS 2018,
arXiv:1802.04942). Eq. 2 decomposes the KL term of the ELBO, averaged over the data n ~ p(n) = 1/N:

    E_p(n)[KL(q(z|n) || p(z))] = I_q(z; n) + KL(q(z) || prod_j q(z_j)) + sum_j KL(q(z_j) || p(z_j))
                                 index-code MI   total correlation (TC)      dimension-wise KL

and the beta-TCVAE weights the three: loss = -log p(x|z) + alpha * MI + beta * TC + gamma * dim-KL.
Per image i, at its posterior draw z_i, the terms are the differences

    mi_i = log q(z_i|x_i) - log q(z_i)
    tc_i = log q(z_i) - sum_j log q(z_ij)
    dim_kl_i = sum_j log q(z_ij) - log p(z_i)

which telescope to the one-sample KL estimate log q(z_i|x_i) - log p(z_i) whatever estimates of the aggregate
posterior q(z) = 1/N sum_n q(z|x_n) and its marginals q(z_j) are used. Both come from the minibatch of B images:

- `mws`, minibatch-weighted sampling (as the authors' code and pythae):
  log q(z_i) ~ logsumexp_b log q(z_i|x_b) - log(N B). N enters only through constants: MI, TC and dim-KL carry
  +log(N B), +(J-1) log(N B) and -J log(N B). They change the logged values (TC reads tens of nats on a model whose
  true TC is small, and a capacity schedule would target the shifted TC), never a gradient.
- `mss`, minibatch stratified sampling (appendix): log q(z_i) ~ logsumexp_b [log w_ib + log q(z_i|x_b)], weight
  1/N on x_i itself, (N - B + 1) / (N (B - 1)) on one other image (the next in the batch, cyclically) and
  1/(B - 1) on the other B - 2. Every row sums to 1, so the values need no shift; N weighs x_i against the rest and
  does shape the gradients. The authors' code, which pythae copies, sets the stratum weight of the last row in row
  B - 2 (and misplaces the diagonal when B = 2; rtqichen/beta-tcvae pull request 1); here every row sums to 1.

log q(z_j) is estimated the same way per dimension. beta is train.beta (`scheduled = "tc"`: constant 1 by default,
or any schedule); alpha and gamma are model options. With alpha = beta = gamma = 1 the loss is the VAE's with a
one-sample KL. The VAE's KL (closed form for the standard normal prior) is logged as the stat `kl`.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable
from pydantic import Field

from vaeflow.core.bounds import MAX_IMAGES
from vaeflow.core.data import open_dataset
from vaeflow.core.distributions import LOG_2PI, DiagonalGaussian
from vaeflow.core.errors import ConfigError, DataError
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import LatentPrior, Objective, Shape
from vaeflow.core.model import component_options
from vaeflow.core.registry import get_registry
from vaeflow.plugins.models import VAE, ContinuousOptions

ESTIMATORS = ("mws", "mss")


class KLDecomposition(NamedTuple):
    """The three terms of eq. 2 per image, each (B,): they sum to log q(z|x) - log p(z)."""

    mi: torch.Tensor  # index-code mutual information, log q(z|x) - log q(z)
    tc: torch.Tensor  # total correlation, log q(z) - sum_j log q(z_j)
    dim_kl: torch.Tensor  # dimension-wise KL, sum_j log q(z_j) - log p(z)


def pairwise_log_density(posterior: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
    """log q(z_ij | x_b) of every draw i under every image b's posterior, per dimension j: z (B, J) -> (B, B, J)."""
    return posterior.log_prob_per_dim(z.unsqueeze(1))  # (B, 1, J) against (B, J) -> (B, B, J)


def mss_log_weights(batch: int, dataset_size: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """log w_ib of minibatch stratified sampling (appendix): row i weighs the batch's posteriors for draw i: (B, B).

    1/N on the diagonal, (N - B + 1) / (N (B - 1)) at (i, i + 1 mod B), 1/(B - 1) elsewhere; each row sums to 1.
    A batch of one has no other image: its row is [1], the draw's own posterior. Built on `device`, so a training
    step copies nothing from the host."""
    if dataset_size < batch:
        raise ValueError(f"minibatch stratified sampling needs the dataset size N ({dataset_size}) to be at least "
                         f"the batch size ({batch}); set model.dataset_size to the number of training images")
    if batch == 1:
        return torch.zeros(1, 1, device=device, dtype=dtype)
    n, rows = dataset_size, torch.arange(batch, device=device)
    weights = torch.full((batch, batch), 1.0 / (batch - 1), device=device, dtype=torch.float64)  # (B, B)
    weights[rows, rows] = 1.0 / n
    weights[rows, (rows + 1) % batch] = (n - batch + 1) / (n * (batch - 1))
    return weights.log().to(dtype)


def estimator_weights(batch: int, dataset_size: int, estimator: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor | None, float]:
    """(log w (B, B) or None, log normalizer) of an estimator: log q(z_i) ~ logsumexp_b [log w_ib + log q(z_i|x_b)]
    - log normalizer. mws weighs every b alike (None, log NB); mss by mss_log_weights (its rows sum to 1, so 0)."""
    if estimator == "mws":
        return None, math.log(dataset_size * batch)
    if estimator == "mss":
        return mss_log_weights(batch, dataset_size, device, dtype), 0.0
    raise ValueError(f"unknown estimator {estimator!r}, expected one of {ESTIMATORS}")


def log_aggregate_posterior(log_q: torch.Tensor, dataset_size: int,
                            estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_i), sum_j log q(z_ij)), each (B,), from the pairwise densities log q(z_ij | x_b) (B, B, J).

    The readable definition; training uses fused_log_aggregate_posterior, tested to give the same values and
    gradients."""
    log_w, log_norm = estimator_weights(log_q.shape[0], dataset_size, estimator, log_q.device, log_q.dtype)
    joint, per_dim = log_q.sum(2), log_q  # (B, B), (B, B, J)
    if log_w is not None:
        joint, per_dim = joint + log_w, per_dim + log_w.unsqueeze(2)
    log_qz = torch.logsumexp(joint, dim=1) - log_norm  # (B,)
    log_marginals = torch.logsumexp(per_dim, dim=1) - log_norm  # (B, J)
    return log_qz, log_marginals.sum(1)


class _FusedAggregatePosterior(torch.autograd.Function):
    """log q(z_i) and log q(z_ij) from the (B, B, J) pairwise Gaussian densities, with a hand-written backward.

    The same values as log_aggregate_posterior(pairwise_log_density(...)), in about a third of the passes over the
    (B, B, J) tensor (six in the forward, eight in the backward): the autograd graph of the readable form keeps a dozen (B, B, J) intermediates and walks each
    back, and at B = 128 those passes, not the networks, set a beta-TCVAE step's time on a CPU. With
    s_ibj = (z_ij - m_bj) / sigma_bj and l_ibj = log N(z_ij; m_bj, sigma_bj^2) = -s^2/2 - log sigma_bj - log(2 pi)/2:
    dl/dz_ij = -s / sigma_bj, dl/dm_bj = s / sigma_bj, dl/dlogvar_bj = (s^2 - 1) / 2; each logsumexp passes its
    gradient on through its softmax over b."""

    @staticmethod
    def forward(ctx, z, mean, logvar, log_w):
        """(log q(z_i) (B,), log q(z_ij) (B, J)) up to the mws constant; log_w (B, B) weighs b for draw i, or None.

        The logsumexps shift by peak_j = max_b -(logvar_bj + log 2 pi) / 2, an upper bound of every l_ibj (and of
        l + log w, as w <= 1) found on (B, J) instead of a max over (B, B, J): exp(l - peak) <= 1 never overflows,
        and draw i's own term, l_iij - peak_j >= -s^2 / 2 - 25 with s ~ N(0, 1) (DiagonalGaussian clamps logvar to
        [-30, 20]), is far from underflow. The shift is folded into the pass that makes l."""
        inv_std = torch.exp(-0.5 * logvar)  # (B, J)
        scaled = (z.unsqueeze(1) - mean).mul_(inv_std)  # (B, B, J) s_ibj; the difference first, for small sigma_bj
        log_norm = -0.5 * (logvar + LOG_2PI)  # (B, J) l at s = 0
        peak = log_norm.amax(0)  # (J,)
        shifted = torch.addcmul(log_norm - peak, scaled, scaled, value=-0.5)  # (B, B, J) l_ibj - peak_j
        joint = shifted.sum(2)  # (B, B) log q(z_i|x_b) - sum_j peak_j
        if log_w is not None:
            joint.add_(log_w)
            shifted.add_(log_w.unsqueeze(2))
        log_qz = torch.logsumexp(joint, 1)  # (B,) still shifted
        joint_softmax = joint.sub_(log_qz.unsqueeze(1)).exp_()  # (B, B)
        shifted.exp_()  # (B, B, J) exp(l - peak), in place
        total = shifted.sum(1, keepdim=True)  # (B, 1, J)
        ctx.save_for_backward(scaled, shifted, total, joint_softmax, inv_std)
        return log_qz.add_(peak.sum()), total.log().add_(peak).squeeze(1)  # (B,), (B, J)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_qz, grad_marginals):
        """Gradients for z, mean and logvar (each (B, J)); log_w is a constant."""
        scaled, shifted, total, joint_softmax, inv_std = ctx.saved_tensors
        grad_log_q = shifted * (grad_marginals.unsqueeze(1) / total)  # (B, B, J) through the marginals' softmax
        grad_log_q.add_((grad_qz.unsqueeze(1) * joint_softmax).unsqueeze(2))  # and through the joint's
        grad_log_q_total = grad_log_q.sum(0)  # (B, J)
        grad_scaled = grad_log_q.mul_(scaled)  # (B, B, J) in place: minus dl/ds times the incoming gradient
        grad_logvar = 0.5 * ((grad_scaled * scaled).sum(0) - grad_log_q_total)  # (B, J) sum_i g (s^2 - 1) / 2
        grad_scaled.mul_(inv_std)  # (B, B, J)
        return -grad_scaled.sum(1), grad_scaled.sum(0), grad_logvar, None


def fused_log_aggregate_posterior(posterior: DiagonalGaussian, z: torch.Tensor, dataset_size: int,
                                  estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_i), sum_j log q(z_ij)), each (B,), as log_aggregate_posterior but without the (B, B, J) graph."""
    log_w, log_norm = estimator_weights(z.shape[0], dataset_size, estimator, z.device, z.dtype)
    log_qz, log_marginals = _FusedAggregatePosterior.apply(z, posterior.mean, posterior.logvar, log_w)  # (B,), (B, J)
    return log_qz - log_norm, log_marginals.sum(1) - z.shape[1] * log_norm


def decompose_kl(posterior: DiagonalGaussian, z: torch.Tensor, prior: LatentPrior, dataset_size: int,
                 estimator: str = "mws") -> KLDecomposition:
    """MI, TC and dimension-wise KL per image at the posterior draws z (B, J) of a batch (Chen et al. 2018, eq. 2)."""
    log_qz_x = posterior.log_prob(z)  # (B,) log q(z_i|x_i)
    log_qz, log_prod_qzj = fused_log_aggregate_posterior(posterior, z, dataset_size, estimator)
    return KLDecomposition(mi=log_qz_x - log_qz, tc=log_qz - log_prod_qzj, dim_kl=log_prod_qzj - prior.log_prob(z))


def declared_train_size(config) -> int | None:
    """The number of training images when the dataset's options state it (shapes: n_train), read without
    generating or loading any image; None otherwise."""
    cls = get_registry().get("dataset", config.data.dataset.name).cls
    return getattr(component_options(cls, config.data.dataset), "n_train", None)


class BetaTCVAEOptions(ContinuousOptions):
    """Options of a beta-TCVAE: the VAE's, the weights of MI and dimension-wise KL, and how q(z) is estimated."""

    alpha: float = Field(1.0, ge=0, description="weight of the index-code mutual information (1 as in the paper)")
    gamma: float = Field(1.0, ge=0, description="weight of the dimension-wise KL (1 as in the paper); the total "
                                                "correlation's weight beta is train.beta")
    estimator: Literal["mws", "mss"] = Field("mws", description="estimator of log q(z): mws (minibatch-weighted "
                                                                "sampling) or mss (minibatch stratified "
                                                                "sampling, appendix)")
    dataset_size: Optional[int] = Field(
        None, gt=0, le=MAX_IMAGES, description="N, the number of training images the estimators "
                                               "weigh the batch against (null: the dataset's "
                                               "n_train when its options have one, else counted "
                                               "from the train split at the first training step)")


class BetaTCVAE(VAE):
    """A VAE whose KL is split into MI, TC and dimension-wise KL, weighted alpha, beta, gamma (Chen et al. 2018)."""

    name = "beta-tcvae"
    Options = BetaTCVAEOptions
    scheduled = "tc"  # train.beta weights the total correlation

    @classmethod
    def build(cls, options, make, shape: Shape, config) -> "BetaTCVAE":
        """The VAE's components, plus alpha, gamma, the estimator and N (stated, declared by the dataset, or later)."""
        model = super().build(options, make, shape, config)
        model.alpha, model.gamma, model.estimator = options.alpha, options.gamma, options.estimator
        model.dataset_size = options.dataset_size or declared_train_size(config)
        model.size_source = config if model.dataset_size is None else None  # counted when first needed
        batch = config.train.batch_size
        if options.estimator == "mss" and model.dataset_size is not None and model.dataset_size < batch:
            raise ConfigError([("model.dataset_size", f"minibatch stratified sampling needs N >= the batch size "
                                                      f"({batch}), got N = {model.dataset_size}")])
        return model

    def train_size(self) -> int:
        """N: as built, or the train split counted once (a dataset whose options do not state its size)."""
        if self.dataset_size is None:
            data = self.size_source.data.dataset.name
            try:
                self.dataset_size = len(open_dataset(self.size_source).torch_dataset("train"))
            except (DataError, OSError) as exc:
                raise ConfigError([("model.dataset_size", f"not set, and the {data!r} train split could not be "
                                                          f"counted ({exc}); set it to the number of training "
                                                          f"images")]) from None
        return self.dataset_size

    def forward(self, x: torch.Tensor) -> Objective:
        """Reconstruction, MI, TC and dimension-wise KL per image (nats), averaged over the batch x (B, C, H, W)."""
        terms, q, z = self.elbo_pass(x)  # reconstruction, kl; z (B, J)
        stats = {"kl": terms.pop("kl").detach()}  # the VAE's KL, for comparison
        parts = decompose_kl(q, z, self.prior, self.train_size(), self.estimator)  # each (B,)
        terms.update(mi=parts.mi.mean(), tc=parts.tc.mean(), dim_kl=parts.dim_kl.mean())
        return Objective(terms, weights={"mi": self.alpha, "dim_kl": self.gamma}, stats=stats)


@hookimpl
def register_models(register):
    """Add the `beta-tcvae` model kind."""
    register(BetaTCVAE)
