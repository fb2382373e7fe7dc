"""plugins/likelihoods.py checked against hand computations, torch.distributions and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from vaeflow.plugins import likelihoods
from vaeflow.core.interfaces import Likelihood
from vaeflow.plugins.likelihoods import Bernoulli, Gaussian, GaussianLearned, gaussian_log_prob

SHAPE = (2, 2, 3)  # (C, H, W)


def _log_sigmoid(v: float) -> float:
    """log sigmoid(v) = -log(1 + e^-v), written so neither side overflows."""
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def _bernoulli_hand(x: torch.Tensor, logits: torch.Tensor) -> list[float]:
    """sum x log p + (1 - x) log(1 - p) per example, in Python floats (log(1-p) = log sigmoid(-l))."""
    out = []
    for xb, lb in zip(x.flatten(1).tolist(), logits.flatten(1).tolist()):
        out.append(sum(xi * _log_sigmoid(li) + (1 - xi) * _log_sigmoid(-li) for xi, li in zip(xb, lb)))
    return out


@pytest.fixture
def bern():
    return Bernoulli(Bernoulli.Options(), SHAPE)


# ------------------------------------------------------------------------------------------ Bernoulli
def test_bernoulli_hand_small(bern):
    # one example, 2 pixels: x = (1, 0), logits = (0, log 3) -> p = (1/2, 3/4)
    x = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])
    want = math.log(0.5) + math.log(0.25)
    assert bern.log_prob(x, logits).item() == pytest.approx(want, rel=1e-6)
    # fractional x = 0.25 at p = 1/2: 0.25 log .5 + .75 log .5 = log .5
    x = torch.tensor([[[[0.25]]]], dtype=torch.float64)
    assert bern.log_prob(x, torch.zeros_like(x)).item() == pytest.approx(math.log(0.5), rel=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
def test_bernoulli_matches_hand_fractional_x(bern, dtype, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, *SHAPE, generator=g, dtype=dtype)  # fractional targets in [0, 1]
    x[0] = (x[0] > 0.5).to(dtype)  # and one binary image
    x[1, 0, 0, 0], x[1, 0, 0, 1] = 0.0, 1.0
    logits = (torch.randn(4, *SHAPE, generator=g, dtype=dtype) * 3).requires_grad_(grad)
    out = bern.log_prob(x, logits)
    assert out.shape == (4,) and out.dtype == dtype
    assert out.requires_grad == grad  # grad=True takes the autograd path (a custom Function, if there is one)
    want = torch.tensor(_bernoulli_hand(x, logits.detach()), dtype=torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 2e-5  # float32: ~1e-7 relative per pixel, 12 pixels
    torch.testing.assert_close(out.detach().double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_extreme_logits_finite(bern, dtype):
    vals = [30.0, -30.0, 30.0, -30.0, 100.0, -100.0, 0.0, 15.0, -15.0, 1e-4, -1e-4, 60.0]
    logits = torch.tensor(vals, dtype=dtype).view(1, *SHAPE)
    xs = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.7, 0.5, 0.0, 1.0, 1.0, 0.0, 0.9], dtype=dtype).view(1, *SHAPE)
    ref_torch = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").flatten(1).sum(1)
    want = _bernoulli_hand(xs, logits)[0]
    for grad in (False, True):
        out = bern.log_prob(xs, logits.clone().requires_grad_(grad))
        assert torch.isfinite(out).all()
        # absolute: the terms reach 100 nats, float32 carries ~1e-5 absolute there
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        assert out.item() == pytest.approx(ref_torch.item(), abs=tol)
        assert out.item() == pytest.approx(want, abs=tol)
    # the per-pixel hand values: x=1, l=30 -> -softplus(-30) ~ -9.4e-14; x=0, l=30 -> -30 - 9.4e-14
    one = torch.tensor([[[[30.0]]]], dtype=torch.float64)
    assert bern.log_prob(torch.ones_like(one), one.requires_grad_()).item() == pytest.approx(
        -math.exp(-30), rel=1e-6
    )
    assert bern.log_prob(torch.zeros_like(one), one).item() == pytest.approx(-30 - math.exp(-30), rel=1e-15)


def test_bernoulli_custom_grad_equals_no_grad_value(bern):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, *SHAPE, generator=g)
    logits = torch.randn(5, *SHAPE, generator=g) * 4
    with torch.no_grad():
        plain = bern.log_prob(x, logits.requires_grad_(True))  # no_grad -> the BCE path
    custom = bern.log_prob(x, logits)
    assert custom.grad_fn is not None
    torch.testing.assert_close(custom.detach(), plain, rtol=1e-5, atol=1e-5)  # float32 rounding


def test_bernoulli_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    logits = (torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) * 2)
    logits = torch.where(logits.abs() < 1e-3, logits + 0.01, logits).requires_grad_(True)  # keep off the l=0 seam
    custom = getattr(likelihoods, "_BernoulliLogProb", None)  # the hand-written backward, where present
    if custom is not None:
        assert torch.autograd.gradcheck(lambda l: custom.apply(l, x), (logits,), eps=1e-6, atol=1e-6)
    lik = Bernoulli(Bernoulli.Options(), SHAPE)
    assert torch.autograd.gradcheck(lambda l: lik.log_prob(x, l), (logits,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_gradient_analytic_nonuniform_upstream(bern, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, *SHAPE, generator=g, dtype=dtype)
    base = torch.randn(4, *SHAPE, generator=g, dtype=dtype) * 5
    base[0, 0, 0, 0], base[0, 0, 0, 1] = 30.0, -30.0
    w = torch.tensor([0.5, -2.0, 3.0, 0.0], dtype=dtype)  # per-example upstream gradient
    logits = base.clone().requires_grad_(True)
    (bern.log_prob(x, logits) * w).sum().backward()
    want = w.view(-1, 1, 1, 1) * (x - torch.sigmoid(base))  # d/dl [x l - softplus(l)] = x - sigmoid(l)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(logits.grad, want, rtol=tol, atol=tol)
    # and against autograd of torch's own BCE
    ref = base.clone().requires_grad_(True)
    (-F.binary_cross_entropy_with_logits(ref, x, reduction="none").flatten(1).sum(1) * w).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=tol, atol=tol)


def test_bernoulli_gradient_through_noncontiguous_logits(bern):
    """Logits that are a permuted view (as a channels-last decoder could give) still get the right gradient."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    raw = torch.randn(3, 2, 3, 2, generator=g, dtype=torch.float64).requires_grad_(True)  # (B, H, W, C)
    logits = raw.permute(0, 3, 1, 2)  # (B, C, H, W), non-contiguous
    assert not logits.is_contiguous()
    w = torch.tensor([1.0, -1.5, 0.25], dtype=torch.float64)
    out = bern.log_prob(x, logits)
    torch.testing.assert_close(out.detach(), torch.tensor(_bernoulli_hand(x, logits.detach()), dtype=torch.float64))
    (out * w).sum().backward()
    want = (w.view(-1, 1, 1, 1) * (x - torch.sigmoid(logits.detach()))).permute(0, 2, 3, 1)
    torch.testing.assert_close(raw.grad, want, rtol=1e-12, atol=1e-12)


def test_bernoulli_mean_and_sample(bern):
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0, -30.0, 30.0] * 2).view(1, *SHAPE)
    torch.testing.assert_close(bern.mean(logits), torch.sigmoid(logits))
    n = 20_000
    gen = torch.Generator().manual_seed(5)
    s = bern.sample(logits.expand(n, *SHAPE), generator=gen)
    assert s.shape == (n, *SHAPE)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits[0])
    se = torch.sqrt(p * (1 - p) / n)
    assert ((s.mean(0) - p).abs() <= 5 * se + 1e-6).all()  # 5 binomial SEs (exact 0/1 at l = -+30)
    again = bern.sample(logits.expand(n, *SHAPE), generator=torch.Generator().manual_seed(5))
    assert torch.equal(s, again)  # the generator makes it reproducible


# ------------------------------------------------------------------------------------------- Gaussian
def test_gaussian_log_prob_helper_float_and_tensor_agree():
    g = torch.Generator().manual_seed(6)
    x, mu = torch.randn(2, 3, *SHAPE, generator=g, dtype=torch.float64)
    s = 0.37
    want = Normal(mu, s).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mu, math.log(s)), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        gaussian_log_prob(x, mu, torch.tensor(math.log(s), dtype=torch.float64)), want, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("sigma", [0.1, 1.0, 2.5])
def test_gaussian_fixed_hand_and_torch(sigma):
    lik = Gaussian(Gaussian.Options(sigma=sigma), SHAPE)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    mu = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    out = lik.log_prob(x, mu)
    assert out.shape == (3,)
    hand = [
        sum(-0.5 * ((xi - mi) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi) for xi, mi in zip(xb, mb))
        for xb, mb in zip(x.flatten(1).tolist(), mu.flatten(1).tolist())
    ]
    torch.testing.assert_close(out, torch.tensor(hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, Normal(mu, sigma).log_prob(x).flatten(1).sum(1), rtol=1e-12, atol=1e-12)


def test_gaussian_fixed_maximised_at_mean():
    """The seed notes drop the minus sign; log p must peak at x == mean and fall off on both sides."""
    lik = Gaussian(Gaussian.Options(sigma=0.2), SHAPE)
    g = torch.Generator().manual_seed(8)
    mu = torch.rand(1, *SHAPE, generator=g, dtype=torch.float64)
    d = torch.randn(1, *SHAPE, generator=g, dtype=torch.float64)
    ts = torch.linspace(-1, 1, 21, dtype=torch.float64)
    vals = torch.stack([lik.log_prob(mu + t * d, mu)[0] for t in ts])
    assert vals.argmax().item() == 10  # t = 0
    assert (vals[11:].diff() < 0).all() and (vals[:10].diff() > 0).all()
    # the peak value is the normaliser alone: -D (log sigma + 1/2 log 2 pi)
    dims = math.prod(SHAPE)
    assert vals[10].item() == pytest.approx(-dims * (math.log(0.2) + 0.5 * math.log(2 * math.pi)), rel=1e-13)
    # a gradient step on the mean moves it towards x (sign of d/dmu = (x - mu)/sigma^2)
    m = mu.clone().requires_grad_(True)
    x = mu + d
    lik.log_prob(x, m).sum().backward()
    torch.testing.assert_close(m.grad, d / 0.2**2)


def test_gaussian_fixed_options_validation():
    with pytest.raises(Exception):
        Gaussian.Options(sigma=0.0)
    with pytest.raises(Exception):
        Gaussian.Options(sigma=-1.0)


def test_gaussian_fixed_mean_and_sample():
    lik = Gaussian(Gaussian.Options(sigma=0.3), SHAPE)
    mu = torch.linspace(-1, 1, 12).view(1, *SHAPE)
    assert torch.equal(lik.mean(mu), mu)
    n = 40_000
    s = lik.sample(mu.expand(n, *SHAPE), generator=torch.Generator().manual_seed(9))
    assert s.shape == (n, *SHAPE)
    # mean SE 0.3/sqrt(n) = 1.5e-3, std SE 0.3/sqrt(2n) = 1.1e-3; 5 SE margins
    assert ((s.mean(0) - mu[0]).abs() < 5 * 0.3 / math.sqrt(n)).all()
    assert ((s.std(0) - 0.3).abs() < 5 * 0.3 / math.sqrt(2 * n)).all()
    s64 = lik.sample(mu.double().expand(4, *SHAPE))
    assert s64.dtype == torch.float64


# ------------------------------------------------------------------------------------ GaussianLearned
def _effective_log_sigma(raw: torch.Tensor | float, min_sigma: float):
    """The smooth lower bound of _split: log sigma = log min + softplus(raw - log min)."""
    floor = math.log(min_sigma)
    raw = torch.as_tensor(raw, dtype=torch.float64)
    return floor + torch.log1p(torch.exp(raw - floor))


@pytest.mark.parametrize("init_sigma,min_sigma", [(0.1, 1e-3), (0.5, 0.2), (0.0101, 0.01)])
def test_gaussian_learned_shared_value_and_gradient(init_sigma, min_sigma):
    lik = GaussianLearned(GaussianLearned.Options(sigma="shared", init_sigma=init_sigma, min_sigma=min_sigma), SHAPE)
    assert isinstance(lik.log_sigma, torch.nn.Parameter)
    assert any(p is lik.log_sigma for p in lik.parameters())
    assert lik.param_channels(SHAPE[0]) == SHAPE[0]
    lik = lik.double()
    eff_log = _effective_log_sigma(lik.log_sigma.item(), min_sigma)
    eff = eff_log.exp().item()
    assert eff == pytest.approx(init_sigma, rel=1e-5)  # the bound is inverted at init: sigma starts at init_sigma
    g = torch.Generator().manual_seed(10)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    mu = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    out = lik.log_prob(x, mu)
    torch.testing.assert_close(out, Normal(mu, eff).log_prob(x).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert lik.log_sigma.grad is not None
    # d/d raw: sum_pixels ((x - mu)^2 / sigma^2 - 1) * d log sigma / d raw, the latter sigmoid(raw - floor)
    r2 = (x - mu).pow(2).sum().item()
    dlog = 1 / (1 + math.exp(-(lik.log_sigma.item() - math.log(min_sigma))))
    want = (r2 / eff**2 - x.numel()) * dlog
    assert lik.log_sigma.grad.item() == pytest.approx(want, rel=1e-10)
    assert torch.equal(lik.mean(mu), mu)


def test_gaussian_learned_rejects_init_at_or_below_the_floor():
    with pytest.raises(ValueError, match="must exceed min_sigma"):
        GaussianLearned(GaussianLearned.Options(sigma="shared", init_sigma=0.01, min_sigma=0.01), SHAPE)


def test_gaussian_learned_shared_sample_statistics():
    lik = GaussianLearned(GaussianLearned.Options(sigma="shared", init_sigma=0.4), SHAPE)
    eff = _effective_log_sigma(lik.log_sigma.item(), 1e-3).exp().item()
    mu = torch.linspace(0, 1, 12).view(1, *SHAPE)
    n = 40_000
    with torch.no_grad():
        s = lik.sample(mu.expand(n, *SHAPE), generator=torch.Generator().manual_seed(11))
    assert s.shape == (n, *SHAPE)
    assert ((s.mean(0) - mu[0]).abs() < 5 * eff / math.sqrt(n)).all()  # 5 SE
    assert ((s.std(0) - eff).abs() < 5 * eff / math.sqrt(2 * n)).all()


def test_gaussian_learned_per_pixel_value_mean_sample():
    opts = GaussianLearned.Options(sigma="per-pixel", min_sigma=1e-2)
    lik = GaussianLearned(opts, SHAPE)
    assert not hasattr(lik, "log_sigma") and list(lik.parameters()) == []
    c = SHAPE[0]
    assert lik.param_channels(c) == 2 * c and lik.param_channels(3) == 6
    g = torch.Generator().manual_seed(12)
    x = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    mu = torch.rand(3, *SHAPE, generator=g, dtype=torch.float64)
    raw = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64) - 2.0  # some near the floor
    raw[0, 0, 0, 0] = -20.0  # far below the floor: sigma ~ min_sigma
    params = torch.cat([mu, raw], dim=1)  # (B, 2C, H, W): [mean | log sigma]
    sig = _effective_log_sigma(raw, 1e-2).exp()
    assert sig[0, 0, 0, 0].item() == pytest.approx(1e-2, rel=1e-6)
    out = lik.log_prob(x, params)
    torch.testing.assert_close(out, Normal(mu, sig).log_prob(x).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lik.mean(params), mu, rtol=0, atol=0)
    # gradient flows to the log-sigma channels of the params
    p = params.clone().requires_grad_(True)
    lik.log_prob(x, p).sum().backward()
    assert (p.grad[:, c:] != 0).any()
    torch.testing.assert_close(p.grad[:, :c], (x - mu) / sig**2, rtol=1e-12, atol=1e-12)
    # samples: per-pixel mean and std
    n = 40_000
    one = torch.cat([torch.linspace(-1, 1, 12).view(1, *SHAPE), torch.linspace(-2, 0, 12).view(1, *SHAPE)], 1)
    s = lik.sample(one.expand(n, *one.shape[1:]), generator=torch.Generator().manual_seed(13))
    assert s.shape == (n, *SHAPE)
    sd = _effective_log_sigma(one[0, c:], 1e-2).exp().float()
    assert ((s.mean(0) - one[0, :c]).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((s.std(0) - sd).abs() < 5 * sd / math.sqrt(2 * n)).all()


# ------------------------------------------------------------------------------ Bernoulli over k draws
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_samples_broadcasts_x_like_the_copied_path(bern, dtype):
    """k logits per image: the broadcasting override equals the base class's copy-x-k-times default, in value and
    in the gradients of both the logits and x (x's summed over the k draws)."""
    g = torch.Generator().manual_seed(5)
    k, b = 3, 4
    x = torch.rand(b, *SHAPE, generator=g, dtype=dtype)
    base = torch.randn(k, b, *SHAPE, generator=g, dtype=dtype) * 3
    w = torch.randn(k, b, generator=g, dtype=dtype)  # a non-uniform upstream gradient
    got_l, got_x = base.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = bern.log_prob_samples(got_x, got_l)
    want_l, want_x = base.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = Likelihood.log_prob_samples(bern, want_x, want_l)  # the default: x copied k times
    assert got.shape == (k, b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for i in range(k):  # and per draw, against the hand computation
        torch.testing.assert_close(got[i].detach().double(), torch.tensor(_bernoulli_hand(x, base[i]), dtype=torch.float64),
                                   rtol=tol, atol=tol)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(got_l.grad, want_l.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(got_x.grad, (w.view(k, b, 1, 1, 1) * base).sum(0), rtol=tol, atol=tol)  # d/dx = l


def test_bernoulli_gradcheck_in_logits_and_x_over_k_draws():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, *SHAPE, generator=g, dtype=torch.float64).requires_grad_(True)
    logits = (torch.randn(3, 2, *SHAPE, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, v: likelihoods.bernoulli_log_prob(v, l), (logits, x), eps=1e-6, atol=1e-6)


def test_bernoulli_bf16_logits_score_in_float32(bern):
    """Under bf16 autocast the decoder hands over bf16 logits: the score is float32 of the same logits, and the
    logits' gradient comes back in bf16."""
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(3, *SHAPE, generator=g) > 0.5).float()
    logits = (torch.randn(3, *SHAPE, generator=g) * 3).bfloat16().requires_grad_(True)
    out = bern.log_prob(x, logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.detach().double(), torch.tensor(_bernoulli_hand(x, logits.detach().float()), dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), x - torch.sigmoid(logits.detach().float()), rtol=1e-2, atol=1e-2)
