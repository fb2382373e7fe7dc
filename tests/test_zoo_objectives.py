"""The zoo's objectives against independent numbers: the IWAE bound (plugins/iwae.py) and the beta-TCVAE's KL
decomposition (plugins/tcvae.py), by hand formulas on tiny tensors, closed forms, and reductions to the plain VAE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vaeflow.core.beta import BetaSchedule
from vaeflow.core.config import validate
from vaeflow.core.data import load_split
from vaeflow.core.distributions import DiagonalGaussian
from vaeflow.core.engine import Trainer
from vaeflow.core.errors import ConfigError
from vaeflow.core.interfaces import LatentPrior
from vaeflow.core.model import build_model
from vaeflow.plugins.iwae import IWAE
from vaeflow.plugins.latent_priors import StandardNormal
from vaeflow.plugins.likelihoods import Bernoulli
from vaeflow.plugins.tcvae import (_FusedAggregatePosterior, decompose_kl, fused_log_aggregate_posterior, log_aggregate_posterior,
                           mss_log_weights, pairwise_log_density)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def tiny(kind: str, dataset: dict | None = None, train: dict | None = None, **options):
    """A validated 8x8 shapes config of `kind` with small MLP networks, J = 2."""
    raw = {
        "data": {"dataset": dataset or {"name": "shapes", "image_size": 8, "n_train": 32, "n_test": 8}},
        "model": {"kind": kind, "latent_dim": 2, "encoder": {"name": "mlp", "hidden": [16]},
                  "decoder": {"name": "mlp", "hidden": [16]}, "likelihood": {"name": "bernoulli"}, **options},
        "train": {"batch_size": 8, "progress": False, "device": "cpu", **(train or {})},
    }
    return validate(raw)


def built(kind: str, seed: int = 0, **options):
    """(model, its 8 test images) of a tiny config, initialised from `seed`."""
    cfg = tiny(kind, **options)
    torch.manual_seed(seed)
    return build_model(cfg), load_split(cfg, "test")


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error."""
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


# --- IWAE (Burda et al. 2016) ------------------------------------------------------------------------
def test_iwae_k1_loss_is_the_hand_computed_log_weight():
    """k = 1, one fixed draw: -loss = mean over 2 images of log p(x|z) + log p(z) - log q(z|x), each density
    written out (Bernoulli as x log sigmoid(l) + (1 - x) log(1 - sigmoid(l)), Gaussians from eps)."""
    model, images = built("iwae", samples=1)
    x = images[:2]  # (2, 1, 8, 8)
    torch.manual_seed(7)
    loss = model(x).terms["iwae"]
    with torch.no_grad():
        mean, logvar = model.encoder(x).double().chunk(2, dim=1)  # (2, J) each
        torch.manual_seed(7)
        eps = torch.randn(1, 2, 2)[0].double()  # the draw rsample(1) makes: (B, J)
        z = mean + torch.exp(0.5 * logvar) * eps  # (2, J)
        p = torch.sigmoid(model.decoder(z.float()).double())  # (2, 1, 8, 8)
        xd = x.double()
        log_px = (xd * p.log() + (1 - xd) * (1 - p).log()).flatten(1).sum(1)  # (2,)
        log_pz = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum(1)  # (2,)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * logvar - HALF_LOG_2PI).sum(1)  # (2,)
        want = (log_px + log_pz - log_qz).mean()
    assert -loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-4)


def test_iwae_k1_equals_the_vae_elbo_in_expectation():
    """E[log w] with k = 1 is the ELBO: the IWAE's loss over many draws against the VAE's ELBO (closed-form KL)
    with the same weights, per image, within 4 standard errors."""
    iwae, images = built("iwae", samples=1)
    vae = build_model(tiny("vae"))
    vae.load_state_dict(iwae.state_dict())
    draws = 4000
    with torch.no_grad():
        for x in images[:2]:
            batch = x.expand(draws, *x.shape)  # (R, 1, 8, 8): one image, R independent draws
            torch.manual_seed(1)
            loss = iwae(batch).terms["iwae"]
            torch.manual_seed(1)
            log_w = iwae.log_joint_terms(batch, 1)[0]  # (R,) the same draws, for the standard error
            assert -loss.item() == pytest.approx(log_w.mean().item(), rel=1e-5)
            bound, se_bound = mean_and_se(log_w)
            log_px, kl, _ = vae.elbo_terms(batch)  # (R,), (R,)
            elbo, se_elbo = mean_and_se(log_px - kl)
            assert abs(bound - elbo) < 4 * math.hypot(se_bound, se_elbo), (bound, elbo, se_bound, se_elbo)


class ZeroEncoder(nn.Module):
    """q(z|x) = N(0, 1) for every x, J = 1: the posterior is the prior, so w_i = p(x|z_i)."""

    out_features = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(len(x), 2)  # (B, 2J): mean 0, log-variance 0


class LinearLogit(nn.Module):
    """One pixel with logit a * z: p(x = 1 | z) = sigmoid(a z)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.a * z).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def fixed_iwae(k: int, a: float = 4.0) -> IWAE:
    """An IWAE on one-pixel images whose weights are known: q = p = N(0, 1), w_i = p(x | z_i) = sigmoid(+-a z_i).

    By the symmetry sigmoid(t) + sigmoid(-t) = 1, log p(x) = log E[sigmoid(a z)] = log 1/2 for x = 0 and x = 1."""
    model = IWAE(ZeroEncoder(), LinearLogit(a), Bernoulli(Bernoulli.Options(), (1, 1, 1)),
                 StandardNormal(StandardNormal.Options(), 1), latent_dim=1)
    model.samples = k
    return model


ONE_PIXEL = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)  # two one-pixel images, x = 1 and x = 0


def test_iwae_loss_is_the_log_mean_of_chosen_weights():
    """Chosen weights w (k = 3, B = 2): columns 1, 2, 6 and 2, 4, 6 have means 3 and 4, so -loss = (log 3 + log 4) / 2;
    the ELBO stat is the mean of log w = log(1 * 2 * 6 * 2 * 4 * 6) / 6."""
    model = fixed_iwae(3)
    chosen = torch.tensor([[1.0, 2.0], [2.0, 4.0], [6.0, 6.0]]).log()  # (k, B)
    model.log_weights = lambda x, k: chosen if k == 3 else None
    out = model(ONE_PIXEL)
    assert out.terms["iwae"].item() == pytest.approx(-(math.log(3) + math.log(4)) / 2, rel=1e-6)
    assert out.stats["neg_elbo"].item() == pytest.approx(-math.log(1 * 2 * 6 * 2 * 4 * 6) / 6, rel=1e-6)


def test_iwae_k3_on_a_fixed_model_by_hand():
    """The whole k = 3 path on the fixed model: the drawn eps give w_ib = sigmoid(a z_i) (x = 1) or
    1 - sigmoid(a z_i) (x = 0), and L_3 = log (1/3) sum_i w_ib, written out in floats."""
    a, model = 4.0, fixed_iwae(3)
    torch.manual_seed(11)
    loss = model(ONE_PIXEL).terms["iwae"].item()
    torch.manual_seed(11)
    z = torch.randn(3, 2, 1)[..., 0].tolist()  # (k, B): the draws of rsample(3), mean 0 and std 1
    bounds = []
    for b, x in enumerate((1.0, 0.0)):
        w = [1 / (1 + math.exp(-a * z[i][b])) for i in range(3)]
        w = w if x == 1.0 else [1 - v for v in w]
        bounds.append(math.log(sum(w) / 3))
    assert -loss == pytest.approx(sum(bounds) / 2, rel=1e-5)


def test_iwae_bound_rises_with_k_towards_the_closed_form_log_px():
    """Theorem 1 on the fixed model: E[L_1] < E[L_5] < E[L_50] < E[L_1000] <= log p(x) = log 1/2, each step by more
    than 4 standard errors; E[L_1] = E[log sigmoid(a z)] by quadrature, and L_1000 within 2e-3 of log 1/2."""
    a, repeats = 4.0, 200
    batch = ONE_PIXEL.repeat(repeats, 1, 1, 1)  # (2R, 1, 1, 1)
    estimates = {}
    for k in (1, 5, 50, 1000):
        model = fixed_iwae(k, a)
        torch.manual_seed(k)
        chunks = torch.stack([-model(batch).terms["iwae"] for _ in range(20)])  # 20 means over 2R images
        estimates[k] = mean_and_se(chunks)
    # E[log sigmoid(a z)], z ~ N(0, 1), by the trapezoid rule (the same for x = 0 by symmetry)
    grid = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    density = torch.exp(-0.5 * grid.pow(2)) / math.sqrt(2 * math.pi)
    l1 = torch.trapezoid(density * torch.log(torch.sigmoid(a * grid)), grid).item()
    assert abs(estimates[1][0] - l1) < 4 * estimates[1][1], (estimates[1], l1)
    ks = sorted(estimates)
    for lo, hi in zip(ks, ks[1:]):
        gap, se = estimates[hi][0] - estimates[lo][0], math.hypot(estimates[hi][1], estimates[lo][1])
        assert gap > 4 * se, (lo, hi, estimates)
    log_px = math.log(0.5)
    assert estimates[1000][0] <= log_px + 4 * estimates[1000][1]
    assert estimates[1000][0] == pytest.approx(log_px, abs=2e-3)


def test_iwae_samples_is_bounded():
    for bad in (0, 5001):
        with pytest.raises(ConfigError, match="samples"):
            tiny("iwae", samples=bad)
    model, _ = built("iwae", samples=7)
    assert model.samples == 7 and model.scheduled is None


# --- beta-TCVAE (Chen et al. 2018) ----------------------------------------------------------------------
def random_posterior(batch: int, dim: int, seed: int) -> tuple[DiagonalGaussian, torch.Tensor, torch.Tensor]:
    """(q, z, eps): a diagonal Gaussian posterior of random parameters in float64 and a draw z = mean + std * eps."""
    g = torch.Generator().manual_seed(seed)
    params = torch.cat([torch.randn(batch, dim, generator=g, dtype=torch.float64),
                        torch.randn(batch, dim, generator=g, dtype=torch.float64) - 1], dim=1)  # (B, 2J)
    q = DiagonalGaussian(params)
    eps = torch.randn(batch, dim, generator=g, dtype=torch.float64)  # (B, J)
    return q, q.mean + q.std * eps, eps


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("n", [6, 60000])
def test_the_three_terms_sum_to_the_one_sample_kl(estimator, n):
    """MI + TC + dim-KL = log q(z|x) - log p(z) per image at the same z, for either estimate of q(z); the right side
    by hand: 1/2 sum_j (z^2 - eps^2 - log sigma^2)."""
    q, z, eps = random_posterior(6, 3, seed=0)
    parts = decompose_kl(q, z, StandardNormal(StandardNormal.Options(), 3), n, estimator)
    want = 0.5 * (z.pow(2) - eps.pow(2) - q.logvar).sum(1)  # (B,)
    torch.testing.assert_close(parts.mi + parts.tc + parts.dim_kl, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(parts.tc, torch.zeros_like(parts.tc))  # a real split, not all in one term


def normal_density(z: float, mean: float, std: float) -> float:
    return math.exp(-0.5 * ((z - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def test_log_qz_and_its_marginals_by_hand_on_two_images():
    """B = 2, J = 2, N = 10: posteriors N((0, 0), diag(1, 1)) and N((1, -1), diag(4, 1)), draws (0, 1) and (1, 0).
    MWS: log q(z_i) = log sum_b q(z_i|x_b) - log(N B), and per dimension the same; MSS with B = 2 weighs a draw's own
    posterior 1/N and the other's (N - 1)/N."""
    n = 10
    means, stds = [(0.0, 0.0), (1.0, -1.0)], [(1.0, 1.0), (2.0, 1.0)]
    draws = [(0.0, 1.0), (1.0, 0.0)]
    params = torch.tensor([[*means[b], *(2 * math.log(s) for s in stds[b])] for b in range(2)], dtype=torch.float64)
    q, z = DiagonalGaussian(params), torch.tensor(draws, dtype=torch.float64)
    log_q = pairwise_log_density(q, z)  # (B, B, J)

    def dens(i, b, j):
        return normal_density(draws[i][j], means[b][j], stds[b][j])

    weights = {"mws": lambda i, b: 1 / (n * 2), "mss": lambda i, b: 1 / n if i == b else (n - 1) / n}
    for estimator, w in weights.items():
        want_qz = [math.log(sum(w(i, b) * dens(i, b, 0) * dens(i, b, 1) for b in range(2))) for i in range(2)]
        want_prod = [sum(math.log(sum(w(i, b) * dens(i, b, j) for b in range(2))) for j in range(2)) for i in range(2)]
        log_qz, log_prod = log_aggregate_posterior(log_q, n, estimator)
        torch.testing.assert_close(log_qz, torch.tensor(want_qz, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_prod, torch.tensor(want_prod, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_estimator_matches_the_readable_one_in_values_and_gradients(estimator, dtype):
    """The hand-written backward of the fused (B, B, J) pass gives what autograd gives through
    log_aggregate_posterior(pairwise_log_density(...)), for gradients reaching the posterior's parameters both
    directly and through the reparameterized draw; incoming gradients are random, so every path is weighted."""
    batch, dim, n = 9, 4, 500
    g = torch.Generator().manual_seed(3)
    params = (torch.randn(batch, 2 * dim, generator=g, dtype=torch.float64) * 1.5).to(dtype).requires_grad_()
    eps = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    upstream = torch.randn(2, batch, generator=g, dtype=torch.float64).to(dtype)  # d loss / d log q(z), d sum log q(z_j)
    results = []
    for fused in (False, True):
        q = DiagonalGaussian(params)
        z = q.mean + q.std * eps  # (B, J)
        if fused:
            log_qz, log_prod = fused_log_aggregate_posterior(q, z, n, estimator)
        else:
            log_qz, log_prod = log_aggregate_posterior(pairwise_log_density(q, z), n, estimator)
        grad, = torch.autograd.grad((upstream[0] * log_qz).sum() + (upstream[1] * log_prod).sum(), params)
        results.append((log_qz, log_prod, grad))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for readable, fused in zip(*results):
        torch.testing.assert_close(fused, readable, **tol)
    assert results[1][2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_estimator_holds_when_variances_span_many_orders(dtype):
    """The fused pass shifts by a bound from the smallest variance, not by the max over b: with a batch whose
    log-variances of one dimension span DiagonalGaussian's whole clamp range (-30 to 20: e^50 between variances) and
    4-sigma draws, it still gives the readable values, finite, to float precision."""
    batch, dim, n = 16, 3, 1000
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(batch, dim, generator=g, dtype=torch.float64) * 3
    logvar = torch.linspace(-30, 20, batch, dtype=torch.float64).unsqueeze(1).repeat(1, dim)  # (B, J)
    logvar[:, 1] = logvar[:, 1].flip(0)
    q = DiagonalGaussian(torch.cat([mean, logvar], 1).to(dtype))
    z = q.mean + q.std * torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype) * 4  # (B, J)
    fused = fused_log_aggregate_posterior(q, z, n, "mws")
    readable = log_aggregate_posterior(pairwise_log_density(q, z), n, "mws")
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-3}
    for f, r in zip(fused, readable):
        assert torch.isfinite(f).all()
        torch.testing.assert_close(f, r, **tol)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_fused_backward_passes_gradcheck(weighted):
    """Finite differences of the fused function in float64, with z, means and log-variances independent inputs (so
    each gradient formula is checked on its own, not only their sum through the draw)."""
    g = torch.Generator().manual_seed(4)
    z, mean, logvar = (torch.randn(5, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    log_w = mss_log_weights(5, 20) if weighted else None
    assert torch.autograd.gradcheck(lambda *a: _FusedAggregatePosterior.apply(*a, log_w), (z, mean, logvar))


def test_mss_weights_by_hand():
    """B = 4, N = 10: 1/10 on the diagonal, (10 - 4 + 1) / (10 * 3) = 7/30 at (i, i + 1 mod 4), 1/3 elsewhere."""
    d, s, o = 1 / 10, 7 / 30, 1 / 3
    want = torch.tensor([[d, s, o, o], [o, d, s, o], [o, o, d, s], [s, o, o, d]], dtype=torch.float64)
    torch.testing.assert_close(mss_log_weights(4, 10).exp(), want, rtol=1e-12, atol=0)
    for batch, n in [(2, 2), (3, 3), (16, 1000), (64, 60000)]:
        torch.testing.assert_close(mss_log_weights(batch, n).exp().sum(1), torch.ones(batch, dtype=torch.float64))
    assert mss_log_weights(1, 10).exp().item() == 1.0  # a batch of one: the draw's own posterior
    with pytest.raises(ValueError, match="dataset_size"):
        mss_log_weights(8, 7)


def test_identical_posteriors_have_no_mi_and_no_tc():
    """When every image has the same posterior, q(z) = q(z|x) factorizes: MI = TC = 0 in closed form. MSS (rows
    summing to 1) gives exactly 0 for every draw; MWS is shifted by its constant: MI = log N, TC = (J - 1) log N."""
    batch, dim, n = 16, 3, 1000
    g = torch.Generator().manual_seed(0)
    one = torch.cat([torch.randn(1, dim, generator=g), torch.randn(1, dim, generator=g) - 1], 1).double()  # (1, 2J)
    q = DiagonalGaussian(one.expand(batch, 2 * dim))
    z = q.mean + q.std * torch.randn(batch, dim, generator=g, dtype=torch.float64)  # (B, J)
    prior = StandardNormal(StandardNormal.Options(), dim)
    mss = decompose_kl(q, z, prior, n, "mss")
    torch.testing.assert_close(mss.mi, torch.zeros(batch, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(mss.tc, torch.zeros(batch, dtype=torch.float64), rtol=0, atol=1e-12)
    mws = decompose_kl(q, z, prior, n, "mws")
    torch.testing.assert_close(mws.mi, torch.full((batch,), math.log(n), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(mws.tc, torch.full((batch,), (dim - 1) * math.log(n), dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_tc_estimates_vanish_on_a_factorial_aggregate_posterior_as_the_batch_grows():
    """N = 32 x 32 images with posteriors N((a, b), 0.3^2 I) on a product grid: q(z) = q(z_1) q(z_2) exactly, so TC = 0.
    Averaged over batches drawn without replacement, the MSS estimate and the MWS estimate less its constant
    log N approach 0 as B grows to N."""
    side, std = 32, 0.3
    n = side * side
    grid = torch.linspace(-2, 2, side, dtype=torch.float64)
    means = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(n, 2)  # (N, 2)
    g = torch.Generator().manual_seed(0)
    bias = {"mws": {}, "mss": {}}
    for batch in (16, 128, n):
        tcs = {"mws": [], "mss": []}
        for _ in range(2048 // batch):
            pick = torch.randperm(n, generator=g)[:batch]
            q = DiagonalGaussian(torch.cat([means[pick], torch.full((batch, 2), 2 * math.log(std),
                                                                     dtype=torch.float64)], 1))
            z = q.mean + q.std * torch.randn(batch, 2, generator=g, dtype=torch.float64)  # (B, 2)
            log_q = pairwise_log_density(q, z)  # (B, B, 2)
            for estimator in tcs:
                log_qz, log_prod = log_aggregate_posterior(log_q, n, estimator)
                tcs[estimator].append(log_qz - log_prod)
        bias["mws"][batch] = torch.cat(tcs["mws"]).mean().item() - math.log(n)  # (J - 1) log N with J = 2
        bias["mss"][batch] = torch.cat(tcs["mss"]).mean().item()
    for estimator, by_batch in bias.items():
        sizes = sorted(by_batch)
        assert all(abs(by_batch[b]) > abs(by_batch[c]) for b, c in zip(sizes, sizes[1:])), (estimator, by_batch)
        assert abs(by_batch[n]) < 5e-3, (estimator, by_batch)


def test_unit_weights_give_the_vae_loss_at_the_same_draw():
    """alpha = beta = gamma = 1: reconstruction + MI + TC + dim-KL = the VAE's reconstruction at the same z plus the
    one-sample KL log q(z|x) - log p(z) (LatentPrior's Monte Carlo estimate); the `kl` stat is the VAE's KL term."""
    tcvae, images = built("beta-tcvae", estimator="mss")
    vae = build_model(tiny("vae"))
    vae.load_state_dict(tcvae.state_dict())
    x = images[:6]
    torch.manual_seed(5)
    out = tcvae(x)
    beta = BetaSchedule(tiny("beta-tcvae").train.beta)  # the default: constant 1
    loss = sum(beta.penalty(t) if name == tcvae.scheduled else out.weights.get(name, 1.0) * t
               for name, t in out.terms.items())
    torch.manual_seed(5)
    reference = vae(x)
    torch.manual_seed(5)
    q = vae.posterior(x)
    mc_kl = LatentPrior.kl(vae.prior, q, q.rsample())  # (B,) log q(z|x) - log p(z)
    assert out.terms["reconstruction"].item() == pytest.approx(reference.terms["reconstruction"].item(), rel=1e-6)
    assert loss.item() == pytest.approx((reference.terms["reconstruction"] + mc_kl.mean()).item(), rel=1e-5)
    assert out.stats["kl"].item() == pytest.approx(reference.terms["kl"].item(), rel=1e-6)


def test_the_engine_weighs_mi_tc_and_dim_kl_by_alpha_beta_gamma(tmp_path):
    """One optimizer step: the loss the engine records is reconstruction + 2 MI + 3 TC + 5 dim-KL for alpha = 2,
    train.beta = 3, gamma = 5 (terms are recorded unweighted)."""
    cfg = tiny("beta-tcvae", train={"beta": {"value": 3.0}}, alpha=2.0, gamma=5.0)
    trainer = Trainer(cfg, tmp_path)
    record = trainer.train_step(load_split(cfg, "train")[:8])
    values = dict(zip(("loss", "grad_norm", *trainer.model_terms), record.tolist()))
    want = values["reconstruction"] + 2 * values["mi"] + 3 * values["tc"] + 5 * values["dim_kl"]
    assert values["loss"] == pytest.approx(want, rel=1e-5)


def test_dataset_size_stated_declared_or_counted(tmp_path):
    """N: model.dataset_size when set; else the shapes dataset's n_train, without generating images; else the train
    split counted at the first step (an image folder); an uncountable split asks for model.dataset_size."""
    assert built("beta-tcvae")[0].dataset_size == 32  # n_train of tiny()
    assert built("beta-tcvae", dataset_size=5000)[0].dataset_size == 5000
    from PIL import Image

    for i in range(6):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"img{i}.png")
    folder = {"name": "image-folder", "root": str(tmp_path), "image_size": 8, "channels": 1, "test_fraction": 0.5}
    model = build_model(tiny("beta-tcvae", dataset=folder, estimator="mss"))
    assert model.dataset_size is None  # building read no image
    out = model(torch.rand(3, 1, 8, 8))
    assert model.dataset_size == 3 and torch.isfinite(out.terms["tc"])
    missing = dict(folder, root=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="dataset_size"):
        build_model(tiny("beta-tcvae", dataset=missing)).train_size()


def test_mss_needs_a_dataset_at_least_as_large_as_the_batch():
    with pytest.raises(ConfigError, match="dataset_size"):
        build_model(tiny("beta-tcvae", estimator="mss", dataset_size=4))  # train.batch_size is 8
    assert build_model(tiny("beta-tcvae", estimator="mws", dataset_size=4)).dataset_size == 4  # a constant for MWS
