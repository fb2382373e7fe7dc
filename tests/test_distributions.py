"""core/distributions.py checked against torch.distributions, closed forms and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaeflow.core.distributions import DiagonalGaussian, PointPosterior, standard_normal_log_prob


def _params(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Encoder-style parameters (B, 2J) = [mean | logvar]."""
    return torch.cat([mean, logvar], dim=1)


@pytest.fixture
def q64():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.8
    return mean, logvar, DiagonalGaussian(_params(mean, logvar))


def test_split_mean_logvar_std(q64):
    mean, logvar, q = q64
    assert q.mean.shape == (3, 4) and q.logvar.shape == (3, 4)
    torch.testing.assert_close(q.mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(q.logvar, logvar, rtol=0, atol=0)
    torch.testing.assert_close(q.std, torch.exp(0.5 * logvar), rtol=1e-14, atol=0)
    torch.testing.assert_close(q.mode(), mean, rtol=0, atol=0)


def test_kl_hand_computed_single_dim():
    # mu = 1, sigma^2 = e: KL = 1/2 (1 + e - 1 - 1) = (e - 1) / 2
    q = DiagonalGaussian(torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    assert q.kl().item() == pytest.approx((math.e - 1) / 2, rel=1e-14)
    # mu = 0, sigma^2 = 1/4 (logvar = -log 4): KL = 1/2 (1/4 - 1 + log 4)
    q = DiagonalGaussian(torch.tensor([[0.0, -math.log(4.0)]], dtype=torch.float64))
    assert q.kl().item() == pytest.approx(0.5 * (0.25 - 1 + math.log(4.0)), rel=1e-14)


def test_kl_matches_torch_distributions(q64):
    mean, logvar, q = q64
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))  # (B, J)
    torch.testing.assert_close(q.kl_per_dim(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.kl(), ref.sum(1), rtol=1e-12, atol=1e-12)
    assert q.kl().shape == (3,)


def test_kl_per_dim_sums_to_kl(q64):
    _, _, q = q64
    assert q.kl_per_dim().shape == (3, 4)
    torch.testing.assert_close(q.kl_per_dim().sum(1), q.kl(), rtol=1e-14, atol=0)


def test_kl_matches_monte_carlo():
    torch.manual_seed(1)
    mean = torch.tensor([[0.7, -1.2, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5, 0.4, 1.1]], dtype=torch.float64)
    q = DiagonalGaussian(_params(mean, logvar))
    n = 400_000
    z = q.rsample(n)  # (n, 1, 3)
    ref_q = Normal(mean, torch.exp(0.5 * logvar))
    log_ratio = (ref_q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).squeeze(1)  # (n,)
    mc, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(n)
    # The MC mean of log q - log p is unbiased for KL; 4 standard errors leaves a ~6e-5 false-alarm rate.
    assert abs(q.kl().item() - mc) < 4 * se, (q.kl().item(), mc, se)
    assert se < 0.01  # the check is actually tight


def test_kl_sign_and_zero():
    zero = DiagonalGaussian(torch.zeros(2, 6, dtype=torch.float64))
    assert torch.equal(zero.kl(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(zero.kl_per_dim(), torch.zeros(2, 3, dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    q = DiagonalGaussian(torch.randn(500, 8, generator=g, dtype=torch.float64) * 3)
    assert (q.kl_per_dim() >= 0).all()
    assert (q.kl() > 0).all()  # strictly positive away from (0, 0)
    # each of the two deviations alone gives a positive KL
    assert DiagonalGaussian(torch.tensor([[0.1, 0.0]])).kl().item() > 0
    assert DiagonalGaussian(torch.tensor([[0.0, 0.1]])).kl().item() > 0
    assert DiagonalGaussian(torch.tensor([[0.0, -0.1]])).kl().item() > 0


def test_log_prob_matches_torch_normal(q64):
    mean, logvar, q = q64
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 3, 4, generator=g, dtype=torch.float64) * 2
    ref = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)  # (5, 3)
    out = q.log_prob(z)
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # also without the sample dimension
    torch.testing.assert_close(q.log_prob(z[0]), ref[0], rtol=1e-12, atol=1e-12)


def test_standard_normal_log_prob():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 2, 3, generator=g, dtype=torch.float64)
    ref = Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(standard_normal_log_prob(z), ref, rtol=1e-13, atol=1e-13)
    assert standard_normal_log_prob(torch.zeros(1, 2, dtype=torch.float64)).item() == pytest.approx(
        -math.log(2 * math.pi), rel=1e-14
    )


def test_rsample_shapes_and_statistics():
    torch.manual_seed(6)
    mean = torch.tensor([[1.5, -2.0], [0.0, 0.3]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(0.25)], [math.log(4.0), -1.0]], dtype=torch.float64)
    q = DiagonalGaussian(_params(mean, logvar))
    assert q.rsample().shape == (2, 2)
    assert q.rsample().dtype == torch.float64
    n = 200_000
    z = q.rsample(n)
    assert z.shape == (n, 2, 2)
    std = torch.exp(0.5 * logvar)
    # sample mean has SE std/sqrt(n); sample std has SE ~ std/sqrt(2n) for a Gaussian; 5 SE margins
    assert ((z.mean(0) - mean).abs() < 5 * std / math.sqrt(n)).all()
    assert ((z.std(0) - std).abs() < 5 * std / math.sqrt(2 * n)).all()
    # different draws
    assert not torch.equal(z[0], z[1])


def test_rsample_reparameterization_gradients():
    mean = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.5, -0.7, 0.0]], dtype=torch.float64)
    params = _params(mean, logvar).requires_grad_(True)
    q = DiagonalGaussian(params)
    torch.manual_seed(7)
    z = q.rsample()
    torch.manual_seed(7)
    eps = torch.randn(1, 3, dtype=torch.float64)  # the same draw as rsample's
    std = torch.exp(0.5 * logvar)
    torch.testing.assert_close(z.detach(), mean + std * eps, rtol=1e-14, atol=1e-14)
    for j in range(3):  # one output at a time gives d z_j / d params, i.e. the Jacobian row
        (grad,) = torch.autograd.grad(z[0, j], params, retain_graph=True)
        want = torch.zeros(1, 6, dtype=torch.float64)
        want[0, j] = 1.0  # d z / d mean = 1
        want[0, 3 + j] = 0.5 * std[0, j] * eps[0, j]  # d z / d logvar = 1/2 std eps
        torch.testing.assert_close(grad, want, rtol=1e-13, atol=1e-15)
    # k samples: gradient of the sum wrt the mean is k
    zk = DiagonalGaussian(params).rsample(11)
    (grad,) = torch.autograd.grad(zk.sum(), params)
    torch.testing.assert_close(grad[:, :3], torch.full((1, 3), 11.0, dtype=torch.float64))


def test_point_posterior():
    g = torch.Generator().manual_seed(8)
    code = torch.randn(4, 3, generator=g)
    p = PointPosterior(code)
    assert torch.equal(p.mode(), code) and torch.equal(p.rsample(), code)
    zk = p.rsample(5)
    assert zk.shape == (5, 4, 3)
    assert torch.equal(zk, code.expand(5, 4, 3))
    assert p.kl().shape == (4,) and torch.equal(p.kl(), torch.zeros(4))
    assert p.kl_per_dim().shape == (4, 3) and torch.equal(p.kl_per_dim(), torch.zeros(4, 3))
    # gradients reach the code through rsample (it is deterministic)
    c = code.clone().requires_grad_(True)
    PointPosterior(c).rsample(5).sum().backward()
    torch.testing.assert_close(c.grad, torch.full((4, 3), 5.0))
