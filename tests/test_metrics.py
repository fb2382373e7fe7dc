"""core/metrics.py: the IWAE bound against known answers (probabilistic PCA, quadrature), evaluate() by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaeflow.core.config import EvalConfig
from vaeflow.core.interfaces import Decoder, Encoder, Options
from vaeflow.core.metrics import bits_per_dim, evaluate, iwae_log_likelihood
from vaeflow.plugins.latent_priors import StandardNormal
from vaeflow.plugins.models import AE, VAE
from vaeflow.plugins.likelihoods import Bernoulli, Gaussian

IMG = (1, 4, 4)


# ------------------------------------------------------------------------------------ tiny components
class LinearEncoder(Encoder):
    """x -> Linear(flatten(x)): random weights from the global seed."""

    def __init__(self, options, in_shape, out_features):
        super().__init__(options, in_shape, out_features)
        self.lin = nn.Linear(math.prod(in_shape), out_features)

    def forward(self, x):
        return self.lin(x.flatten(1))


class LinearDecoder(Decoder):
    """z -> Linear(z) viewed as (B, *out_shape)."""

    def __init__(self, options, latent_dim, out_shape):
        super().__init__(options, latent_dim, out_shape)
        self.lin = nn.Linear(latent_dim, math.prod(out_shape))

    def forward(self, z):
        return self.lin(z).view(-1, *self.out_shape)


class AffineEncoder(Encoder):
    """Posterior [mean | logvar] with mean = (flatten(x) - center) A^T + shift and a constant logvar."""

    def __init__(self, in_shape, A, center, shift, logvar):
        super().__init__(Options(), in_shape, 2 * A.shape[0])
        for name, t in dict(A=A, center=center, shift=shift, logvar=logvar).items():
            self.register_buffer(name, t)

    def forward(self, x):
        mean = (x.flatten(1) - self.center) @ self.A.T + self.shift  # (B, J)
        return torch.cat([mean, self.logvar.expand_as(mean)], dim=1)


class AffineDecoder(Decoder):
    """z -> W z + b viewed as (B, *out_shape): the mean of a probabilistic-PCA model."""

    def __init__(self, W, b, out_shape):
        super().__init__(Options(), W.shape[1], out_shape)
        self.register_buffer("W", W)
        self.register_buffer("b", b)

    def forward(self, z):
        return (z @ self.W.T + self.b).view(-1, *self.out_shape)


def assemble(encoder, decoder, likelihood, latent_dim: int, kind: str = "vae") -> VAE:
    """A vae (or ae) from hand-made components, with the standard normal prior."""
    cls = {"vae": VAE, "ae": AE}[kind]
    return cls(encoder, decoder, likelihood, StandardNormal(StandardNormal.Options(), latent_dim), latent_dim)


def bernoulli_vae(latent_dim: int, seed: int, kind: str = "vae") -> VAE:
    torch.manual_seed(seed)
    out = 2 * latent_dim if kind == "vae" else latent_dim
    return assemble(LinearEncoder(Options(), IMG, out), LinearDecoder(Options(), latent_dim, IMG),
                    Bernoulli(Bernoulli.Options(), IMG), latent_dim, kind)


# -------------------------------------------------------------------------- IWAE on a random Bernoulli VAE
def test_iwae_rises_with_k_and_bounds_elbo():
    model = bernoulli_vae(4, seed=0)
    torch.manual_seed(1)
    n = 1000
    x = (torch.rand(n, *IMG) > 0.5).float()
    iw = {k: iwae_log_likelihood(model, x, k).double() for k in (1, 10, 100)}
    log_px, kl, kl_dims = model.elbo_terms(x)
    elbo = (log_px - kl).double()
    assert log_px.shape == kl.shape == (n,) and kl_dims.shape == (n, 4)
    torch.testing.assert_close(kl_dims.sum(1), kl)

    def paired(a, b):  # mean of b - a and its standard error over the n examples
        d = b - a
        return d.mean().item(), d.std().item() / math.sqrt(n)

    # E[IWAE_k] rises with k (Burda et al. 2016, Thm 1). Measured gaps are ~1.0 and ~0.19 nats with paired
    # standard errors ~0.07 and ~0.02, so requiring a rise of more than 3 SE is safe yet far from vacuous.
    for lo, hi in ((1, 10), (10, 100)):
        gain, se = paired(iw[lo], iw[hi])
        assert gain > 3 * se and gain > 0, (lo, hi, gain, se)
    # and the rise slows down (concavity in log k)
    assert (iw[10] - iw[1]).mean() > (iw[100] - iw[10]).mean()
    # IWAE_1 and the closed-form-KL ELBO are two unbiased estimates of the same ELBO: agree within 4 SE
    diff, se = paired(elbo, iw[1])
    assert abs(diff) < 4 * se, (diff, se)
    # every k >= 10 beats the ELBO estimate on average
    gain, se = paired(elbo, iw[10])
    assert gain > 3 * se


def test_iwae_converges_to_quadrature_log_likelihood():
    """J = 2 Bernoulli VAE: log p(x) = log of a 2-D integral, computed on a fine grid in float64."""
    model = bernoulli_vae(2, seed=2).double()
    assert next(model.parameters()).dtype == torch.float64
    torch.manual_seed(3)
    x = (torch.rand(20, *IMG) > 0.5).double()
    grid = torch.linspace(-8, 8, 641, dtype=torch.float64)
    h = (grid[1] - grid[0]).item()
    z = torch.cartesian_prod(grid, grid)  # (G, 2)
    with torch.no_grad():
        logits = model.decode(z).flatten(1)  # (G, D)
    # log p(x|z) = sum x l - softplus(l); p(z) = N(0, I); Riemann sum with cell area h^2 (the integrand is
    # smooth on the scale of h = 0.025 and negligible beyond |z| = 8, so the quadrature error is << 1e-6)
    log_pxz = x.flatten(1) @ logits.T - nn.functional.softplus(logits).sum(1)  # (N, G)
    log_px = torch.logsumexp(log_pxz - 0.5 * z.pow(2).sum(1) - math.log(2 * math.pi), dim=1) + 2 * math.log(h)
    torch.manual_seed(4)
    gaps = {k: (log_px - iwae_log_likelihood(model, x, k, chunk=1000)) for k in (1, 10000)}
    assert gaps[1].dtype == torch.float64
    # k = 1: a single-sample ELBO, below log p(x) by KL(q || p(z|x)) -- large for random encoder weights
    # (measured ~1.8 nats; 1.25-1.8 over other seeds)
    assert gaps[1].mean() > 0.5
    # k = 10000: the remaining bias is O(1/k) and the noise ~ sqrt(Var(w)/k). Measured: |mean| < 1e-3 and
    # max |gap| < 0.04 nats over several seeds, so 0.02 on the mean of 20 and 0.1 per example leave margin.
    assert gaps[10000].mean().abs() < 0.02, gaps[10000]
    assert gaps[10000].abs().max() < 0.1


# ----------------------------------------------------------------------- probabilistic PCA: exact log p(x)
D_PPCA, J_PPCA, SIGMA = 6, 2, 0.5
PPCA_SHAPE = (1, 2, 3)


def _ppca_params(seed: int, orthogonal: bool = False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_PPCA, J_PPCA, generator=g, dtype=torch.float64)
    if orthogonal:
        W = torch.linalg.qr(W).Q * torch.tensor([1.5, 0.7], dtype=torch.float64)  # W^T W diagonal
    else:
        W[:, 1] = 0.6 * W[:, 0] + 0.8 * W[:, 1]  # correlated columns: the exact posterior is not diagonal
    b = 0.5 * torch.randn(D_PPCA, generator=g, dtype=torch.float64)
    return W, b, g


def _ppca_model(W, b, shift_in_std=0.0, var_inflation=1.0, mean_field=False):
    """PPCA decoder + Gaussian(sigma) likelihood; the encoder is the exact posterior mean M^-1 W^T (x - b),
    shifted by `shift_in_std` posterior standard deviations, with diagonal variance (marginal or mean-field)
    times `var_inflation`. Built in float32 like a real model, then converted with .double()."""
    M = W.T @ W + SIGMA**2 * torch.eye(J_PPCA, dtype=torch.float64)
    var = SIGMA**2 / torch.diagonal(M) if mean_field else SIGMA**2 * torch.diagonal(torch.linalg.inv(M))
    enc = AffineEncoder(
        PPCA_SHAPE, torch.linalg.solve(M, W.T).float(), b.float(),
        (shift_in_std * var.sqrt()).float(), (var.log() + math.log(var_inflation)).float(),
    )
    dec = AffineDecoder(W.float(), b.float(), PPCA_SHAPE)
    model = assemble(enc, dec, Gaussian(Gaussian.Options(sigma=SIGMA), PPCA_SHAPE), J_PPCA).double()
    # the exact reference uses the (float32-rounded) weights the model actually holds
    return model, model.decoder.W, model.decoder.b, model.encoder.A


def _ppca_data(W, b, n, g):
    z = torch.randn(n, J_PPCA, generator=g, dtype=torch.float64)
    x = z @ W.T + b + SIGMA * torch.randn(n, D_PPCA, generator=g, dtype=torch.float64)
    C = W @ W.T + SIGMA**2 * torch.eye(D_PPCA, dtype=torch.float64)
    log_px = MultivariateNormal(b, covariance_matrix=C).log_prob(x)  # exact marginal likelihood
    return x.view(n, *PPCA_SHAPE), log_px


def test_ppca_model_runs_in_float64():
    W, b, g = _ppca_params(0)
    model, Wm, bm, _ = _ppca_model(W, b)
    x, _ = _ppca_data(Wm, bm, 3, g)
    lw = model.log_joint_terms(x, 7)
    assert lw.shape == (7, 3) and lw.dtype == torch.float64
    q = model.posterior(x)
    assert q.mean.dtype == torch.float64 and q.rsample(5).dtype == torch.float64


def test_ppca_exact_posterior_gives_exact_iwae_for_every_k():
    """W with orthogonal columns makes p(z|x) diagonal, so q = p(z|x) exactly and every importance weight
    equals p(x): the IWAE estimate is log p(x) for any k, including k not divisible by the chunk size."""
    W, b, g = _ppca_params(1, orthogonal=True)
    model, Wm, bm, _ = _ppca_model(W, b)
    x, log_px = _ppca_data(Wm, bm, 5, g)
    torch.manual_seed(0)
    lw = model.log_joint_terms(x, 50)
    torch.testing.assert_close(lw, log_px.expand(50, 5), rtol=0, atol=1e-5)  # float32-rounded W: M ~ diagonal
    for k, chunk in ((1, 100), (7, 3), (250, 100), (1000, 1000)):
        torch.testing.assert_close(iwae_log_likelihood(model, x, k, chunk=chunk), log_px, rtol=0, atol=1e-5)


def test_ppca_iwae_converges_to_exact_log_likelihood():
    W, b, g = _ppca_params(2)
    # shifted by one posterior std and variance 2x the exact marginal: since the posterior correlation matrix
    # has eigenvalues <= 1 + |rho| <= 2, q dominates p(z|x) in every direction, the weights p(x,z)/q(z) are
    # bounded and IWAE_k has finite variance. Measured Var(w)/E[w]^2 ~ 3, so at k = 20000 the delta-method
    # noise is sqrt(3/20000) ~ 0.012 nats per example and the bias ~3/(2k) ~ 1e-4.
    model, Wm, bm, _ = _ppca_model(W, b, shift_in_std=1.0, var_inflation=2.0)
    x, log_px = _ppca_data(Wm, bm, 16, g)
    torch.manual_seed(5)
    err = {k: (log_px - iwae_log_likelihood(model, x, k, chunk=2000)) for k in (1, 100, 20000)}
    assert err[20000].abs().max() < 0.06  # 5 SE per example
    assert err[20000].mean().abs() < 0.015  # mean of 16: SE 0.003
    # k = 1 is below log p(x) by KL(q || p(z|x)) (several nats here), clearly more than at large k
    assert err[1].mean() > 1.0
    mae = {k: e.abs().mean().item() for k, e in err.items()}
    assert mae[1] > 5 * mae[100] and mae[100] > 3 * mae[20000], mae


def test_ppca_elbo_below_exact_log_likelihood():
    """Exact posterior mean with the mean-field diagonal variance sigma^2 / diag(M): the ELBO is known in
    closed form and sits below log p(x) by exactly KL(q || p(z|x)) > 0 (the true posterior is correlated)."""
    W, b, g = _ppca_params(3)
    model, Wm, bm, A = _ppca_model(W, b, mean_field=True)
    B = 4
    x, log_px = _ppca_data(Wm, bm, B, g)
    q = model.posterior(x)
    m, v = q.mean, q.std.pow(2)  # (B, J)
    torch.testing.assert_close(m, (x.flatten(1) - bm) @ A.T)  # the encoder is what we think it is
    # closed form: E_q log N(x; Wz + b, s^2 I) - KL(q || N(0, I))
    resid = (x.flatten(1) - m @ Wm.T - bm).pow(2).sum(1) + (v * Wm.pow(2).sum(0)).sum(1)
    exp_log_lik = -0.5 * D_PPCA * math.log(2 * math.pi * SIGMA**2) - resid / (2 * SIGMA**2)
    kl_prior = kl_divergence(Normal(m, v.sqrt()), Normal(0.0, 1.0)).sum(1)
    elbo = exp_log_lik - kl_prior
    M = Wm.T @ Wm + SIGMA**2 * torch.eye(J_PPCA, dtype=torch.float64)
    post_cov = SIGMA**2 * torch.linalg.inv(M)
    kl_post = torch.stack([
        kl_divergence(MultivariateNormal(m[i], torch.diag(v[i])), MultivariateNormal(m[i], post_cov)) for i in range(B)
    ])
    torch.testing.assert_close(log_px - elbo, kl_post, rtol=1e-9, atol=1e-9)  # the reference is consistent
    assert (kl_post > 0.05).all()
    assert (elbo < log_px - 0.05).all()

    # the code's ELBO pieces, averaged over R single-sample draws, match the closed form within 4 SE
    R = 4000
    torch.manual_seed(6)
    log_lik, kl, _ = model.elbo_terms(x.repeat(R, 1, 1, 1))  # one z per row
    torch.testing.assert_close(kl.view(R, B)[0], kl_prior, rtol=1e-12, atol=1e-12)
    est = (log_lik - kl).view(R, B)
    se = est.std(0) / math.sqrt(R)
    assert ((est.mean(0) - elbo).abs() < 4 * se).all(), (est.mean(0) - elbo, se)
    assert (est.mean(0) < log_px).all()
    # the same through log_joint_terms: mean of log w over samples = ELBO
    lw = model.log_joint_terms(x, R)
    se = lw.std(0) / math.sqrt(R)
    assert ((lw.mean(0) - elbo).abs() < 4 * se).all()


# ------------------------------------------------------------------------------------------- evaluate()
def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0, rel=1e-15)
    assert bits_per_dim(100.0, 10) == pytest.approx(10 / math.log(2), rel=1e-15)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(10)
    return torch.rand(200, *IMG, generator=g)


def test_evaluate_vae_metrics(images):
    model = bernoulli_vae(3, seed=11)
    cfg = EvalConfig(iwae_k=100, batch_size=64, seed=0)  # 200 = 3 * 64 + 8: a ragged last batch
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = evaluate(model, images, cfg)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left as it was
    n, dims = 200, 16
    assert out["examples"] == n and out["dims"] == dims and out["latent_dim"] == 3 and out["iwae_k"] == 100

    recon = model.reconstruct(images)  # sigmoid(decoder(encoder mean))
    mse = (recon.double() - images.double()).pow(2).mean().item()
    assert out["mse"] == pytest.approx(mse, rel=1e-5)  # float32 sums over 3200 pixels
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / out["mse"]), rel=1e-12)
    assert out["neg_elbo_bits_per_dim"] == pytest.approx(out["neg_elbo_nats"] / (dims * math.log(2)), rel=1e-12)
    assert out["iwae_nll_bits_per_dim"] == pytest.approx(out["iwae_nll_nats"] / (dims * math.log(2)), rel=1e-12)
    assert out["neg_elbo_nats"] == pytest.approx(out["reconstruction_nats"] + out["kl_nats"], rel=1e-6)

    # the KL is deterministic: compare with torch.distributions on the encoder output
    with torch.no_grad():
        mean, logvar = model.encoder(images).double().chunk(2, dim=1)
    kl_dims = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean(0)  # (J,)
    assert len(out["kl_per_dim"]) == 3
    np.testing.assert_allclose(out["kl_per_dim"], kl_dims.numpy(), rtol=1e-5)
    assert sum(out["kl_per_dim"]) == pytest.approx(out["kl_nats"], rel=1e-6)
    assert out["kl_nats"] == pytest.approx(kl_dims.sum().item(), rel=1e-5)

    # IWAE (k = 100) <= single-sample ELBO up to noise. Measured for this model and data (200 repeats): the
    # single-sample neg-ELBO mean over 200 examples has SE ~0.06 nats, the IWAE-100 mean ~0.006 nats, and
    # the expected gap is ~0.46 nats. So 0.3 nats of slack is 5 SE, and the outright check is ~8 SE.
    assert out["iwae_nll_nats"] <= out["neg_elbo_nats"] + 0.3
    assert out["iwae_nll_nats"] < out["neg_elbo_nats"]

    # unit variances are Var_x of the posterior mean, unbiased
    np.testing.assert_allclose(out["unit_variance"], mean.var(0, unbiased=True).numpy(), rtol=1e-5)
    assert out["active_units"] == int((mean.var(0) > cfg.active_threshold).sum())

    # same seed, same numbers; and max_examples takes the first N
    assert evaluate(model, images, cfg) == out
    few = evaluate(model, images, EvalConfig(iwae_k=10, max_examples=30, seed=1))
    assert few["examples"] == 30
    assert few["mse"] == pytest.approx((recon[:30].double() - images[:30].double()).pow(2).mean().item(), rel=1e-5)


def test_evaluate_float64_model(images):
    model = bernoulli_vae(2, seed=12).double()
    out = evaluate(model, images[:40].double(), EvalConfig(iwae_k=20, batch_size=16))
    mse = (model.reconstruct(images[:40].double()) - images[:40].double()).pow(2).mean().item()
    assert out["mse"] == pytest.approx(mse, rel=1e-12)
    assert sum(out["kl_per_dim"]) == pytest.approx(out["kl_nats"], rel=1e-12)


def test_evaluate_active_units_counts_dims_whose_mean_varies():
    """J = 5: dims 0, 2 vary strongly with x, dim 4 varies a little (var ~ 1e-3 < 0.01), dims 1, 3 are constant."""
    g = torch.Generator().manual_seed(13)
    x = torch.rand(300, *IMG, generator=g)
    J, D = 5, 16
    A = torch.zeros(J, D)
    A[0, :8] = 1.0  # Var = 8/12
    A[2, 3] = 2.0  # Var = 4/12
    A[4, 5] = 0.1  # Var = 0.01/12 ~ 8e-4
    shift = torch.tensor([0.0, 0.7, 0.0, -1.3, 0.0])
    enc = AffineEncoder(IMG, A, torch.zeros(D), shift, torch.full((J,), -1.0))
    torch.manual_seed(14)
    model = assemble(enc, LinearDecoder(Options(), J, IMG), Bernoulli(Bernoulli.Options(), IMG), J)
    means = x.flatten(1).double().numpy() @ A.double().numpy().T + shift.double().numpy()
    want_var = means.var(axis=0, ddof=1)
    assert want_var[[1, 3]].max() == 0.0 and 1e-4 < want_var[4] < 0.01 and want_var[[0, 2]].min() > 0.1
    out = evaluate(model, x, EvalConfig(iwae_k=5, batch_size=128))
    np.testing.assert_allclose(out["unit_variance"], want_var, rtol=1e-4, atol=1e-9)
    assert out["active_units"] == 2
    out = evaluate(model, x, EvalConfig(iwae_k=5, batch_size=128, active_threshold=1e-4))
    assert out["active_units"] == 3 and out["active_threshold"] == 1e-4
    # one example: no variance, no active unit
    assert evaluate(model, x[:1], EvalConfig(iwae_k=5))["active_units"] == 0


ELBO_KEYS = {"neg_elbo_nats", "neg_elbo_bits_per_dim", "reconstruction_nats", "kl_nats", "iwae_k",
             "iwae_nll_nats", "iwae_nll_bits_per_dim", "kl_per_dim"}


def test_evaluate_autoencoder_has_no_elbo_keys(images):
    model = bernoulli_vae(3, seed=15, kind="ae")
    assert not model.variational
    out = evaluate(model, images[:50], EvalConfig(iwae_k=10, batch_size=16))
    assert not (ELBO_KEYS & set(out)), ELBO_KEYS & set(out)
    with torch.no_grad():
        code = model.encoder(images[:50])  # (B, J): the code itself, a PointPosterior
        recon = torch.sigmoid(model.decoder(code))
    assert out["mse"] == pytest.approx((recon.double() - images[:50].double()).pow(2).mean().item(), rel=1e-5)
    assert out["psnr"] == pytest.approx(10 * math.log10(1 / out["mse"]), rel=1e-12)
    np.testing.assert_allclose(out["unit_variance"], code.double().var(0).numpy(), rtol=1e-5)
    assert out["active_units"] == int((code.var(0) > 0.01).sum())


def test_evaluate_perfect_autoencoder_has_zero_mse():
    """Identity encoder/decoder with a Gaussian likelihood: reconstructions are exact, mse 0, psnr inf."""

    class Flatten(Encoder):
        def forward(self, x):
            return x.flatten(1)

    class Unflatten(Decoder):
        def forward(self, z):
            return z.view(-1, *self.out_shape)

    model = assemble(Flatten(Options(), IMG, 16), Unflatten(Options(), 16, IMG),
                     Gaussian(Gaussian.Options(), IMG), 16, kind="ae")
    x = torch.rand(10, *IMG, generator=torch.Generator().manual_seed(16))
    out = evaluate(model, x, EvalConfig())
    assert out["mse"] == 0.0 and out["psnr"] == float("inf")
    # every pixel varies across the 10 images: Var ~ 1/12 > 0.01 for (almost surely) all 16 units
    assert out["active_units"] == int((x.flatten(1).var(0) > 0.01).sum()) >= 12


# ------------------------------------------------------------------------ metrics as plugins (family "metric")
def test_evaluate_scores_disentanglement_of_the_posterior_means_only_with_factors(images):
    from vaeflow.core.disentanglement import disentanglement_scores

    model = bernoulli_vae(3, seed=17)
    g = torch.Generator().manual_seed(18)
    factors = torch.stack([torch.randint(0, 3, (200,), generator=g).double(), torch.rand(200, generator=g).double()], 1)
    names, discrete = ("colour", "size"), (True, False)
    cfg = EvalConfig(iwae_k=5, batch_size=64, max_examples=150)
    out = evaluate(model, images, cfg, factors, names, discrete)
    with torch.no_grad():
        means = model.posterior(images[:150]).mode()  # (150, J): the cut applies to the factors too
    want = disentanglement_scores(means, factors[:150], list(names), list(discrete))
    got = {k.removeprefix("disentanglement/"): v for k, v in out.items() if k.startswith("disentanglement/")}
    assert got.keys() == want.keys() and "mig/colour" in got
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # without factors, or switched off: no disentanglement keys, and the other numbers are the same
    plain = evaluate(model, images, cfg)
    off = evaluate(model, images, cfg.model_copy(update={"disentanglement": False}), factors, names, discrete)
    assert plain == off == {k: v for k, v in out.items() if not k.startswith("disentanglement/")}
    # too few examples: the reason, and every other metric still there
    one = evaluate(model, images, cfg.model_copy(update={"max_examples": 1}), factors, names, discrete)
    assert "need at least 2 examples" in one["disentanglement_error"]
    assert one["examples"] == 1 and "neg_elbo_nats" in one and not any(k.startswith("disentanglement/") for k in one)


def tiny_vqvae2():
    """An untrained vqvae2 from the conformance kit's tiny config (levels top and bottom, 16 codes each)."""
    from vaeflow.core.config import validate
    from vaeflow.core.model import build_model
    from vaeflow.core.testing import TINY_MODELS

    torch.manual_seed(19)
    return build_model(validate(TINY_MODELS["discrete"]))


def test_headline_and_param_keys_follow_capabilities():
    from vaeflow.core.metrics import headline_keys, param_keys
    from vaeflow.plugins.models import VQVAE

    vae, vq = headline_keys(VAE.capabilities), headline_keys(VQVAE.capabilities)
    assert "neg_elbo_nats" in vae and "iwae_nll_bits_per_dim" in vae and "disentanglement/mig" in vae
    assert "top_usage" not in vae and "bottom_perplexity" not in vae
    assert "top_usage" in vq and "bottom_perplexity" in vq and "mse" in vq
    assert "neg_elbo_nats" not in vq and "disentanglement/mig" not in vq
    assert len(vae) == len(set(vae))  # mse is a headline of two metrics, listed once
    # counts and settings (MLflow params), whatever the kind
    assert {"examples", "dims", "latent_dim", "active_threshold", "iwae_k", "top_codebook_size"} <= param_keys()
    assert not {"mse", "neg_elbo_nats", "top_usage", "active_units"} & param_keys()


def test_evaluate_of_a_code_grid_model_is_the_codebook_metric():
    model = tiny_vqvae2().eval()
    x = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(20))
    out = evaluate(model, x, EvalConfig(batch_size=8))
    assert {"top_usage", "bottom_dead_codes", "reconstruction_bits_per_dim"} <= set(out)
    assert not {"active_units", "latent_dim", "neg_elbo_nats"} & set(out)
    with torch.no_grad():
        params = model.decode_codes(model.encode_codes(x))  # (20, P, 32, 32)
        nll = -model.likelihood.log_prob(x, params).double().mean().item()
    assert out["reconstruction_nats"] == pytest.approx(nll, rel=1e-5)
    assert out["reconstruction_bits_per_dim"] == pytest.approx(nll / (1024 * math.log(2)), rel=1e-5)
    assert out["top_codebook_size"] == out["bottom_codebook_size"] == 16


THIRD_PARTY_METRICS = """
import torch
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Metric, Options


class Draw(Metric):
    '''Needs a bound on log p(x); reports what evaluate gave it. Named to run before the built-in `latent`.'''

    name = "draw"
    needs = ("continuous", "log_likelihood")
    headline = ("toy/draw",)
    params = ("toy/examples",)

    class Options(Options):
        pass

    def compute(self, ctx):
        return {"toy/draw": torch.rand(()).item(), "toy/examples": len(ctx.images),
                "toy/training": ctx.model.training, "toy/iwae_k": ctx.config.iwae_k}


class Levels(Metric):
    '''Needs code grids.'''

    name = "levels"
    needs = ("discrete",)
    headline = ("toy/levels",)

    class Options(Options):
        pass

    def compute(self, ctx):
        return {"toy/levels": len(ctx.model.levels)}


@hookimpl
def register_metrics(register):
    register(Draw)
    register(Levels)
"""


def test_a_third_party_metric_runs_only_where_the_capabilities_meet_its_needs(local_plugins, images):
    from vaeflow.core.metrics import headline_keys, param_keys

    vae, ae = bernoulli_vae(3, seed=21), bernoulli_vae(3, seed=21, kind="ae")
    cfg = EvalConfig(iwae_k=7, batch_size=64, max_examples=120, seed=3)
    before = {"vae": evaluate(vae, images, cfg), "ae": evaluate(ae, images, cfg)}
    registry = local_plugins({"toy_metrics": THIRD_PARTY_METRICS})
    assert {"draw", "levels"} <= set(registry.names("metric")) and not registry.failures
    assert registry.get("metric", "draw").source == "VAEFLOW_PLUGINS:toy_metrics"

    vae.train()
    out = evaluate(vae, images, cfg)
    assert vae.training  # evaluate ran it in eval mode and restored the mode
    torch.manual_seed(3)
    assert out["toy/draw"] == torch.rand(()).item()  # each metric starts from eval.seed
    assert out["toy/examples"] == 120 and out["toy/training"] is False and out["toy/iwae_k"] == 7
    assert "toy/levels" not in out
    assert {k: v for k, v in out.items() if not k.startswith("toy/")} == before["vae"]  # built-ins unchanged
    assert evaluate(ae, images, cfg) == before["ae"]  # no bound: the toy does not run

    vq = evaluate(tiny_vqvae2(), torch.rand(10, 1, 32, 32), EvalConfig(batch_size=5))
    assert vq["toy/levels"] == 2 and "toy/draw" not in vq

    assert "toy/draw" in headline_keys(VAE.capabilities) and "toy/draw" not in headline_keys(AE.capabilities)
    assert "toy/levels" not in headline_keys(VAE.capabilities)
    assert "toy/examples" in param_keys()


def test_two_metrics_returning_one_key_is_an_error_naming_both(local_plugins, images):
    from vaeflow.core.errors import PluginError

    local_plugins({"toy_clash": """
        from vaeflow.core.hookspecs import hookimpl
        from vaeflow.core.interfaces import Metric, Options

        class MyMSE(Metric):
            name = "my-mse"
            needs = ("continuous",)

            class Options(Options):
                pass

            def compute(self, ctx):
                return {"mse": 0.0}

        @hookimpl
        def register_metrics(register):
            register(MyMSE)
    """})
    with pytest.raises(PluginError, match=r"metric 'my-mse' \(VAEFLOW_PLUGINS:toy_clash\) returns \['mse'\], "
                                          r"already returned by metric 'latent'; give the metric's keys a prefix"):
        evaluate(bernoulli_vae(2, seed=22, kind="ae"), images[:10], EvalConfig())
