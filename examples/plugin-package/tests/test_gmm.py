"""The ex-post Gaussian mixture (vaeflow_example/gmm.py) against independent numbers: a known mixture recovered by EM,
the closed-form single Gaussian, torch.distributions' densities, sample moments and EM's monotone log-likelihood; the
same mixture as the `gmm` latent prior, and the refined model's run dir that the fit_gmm stage writes.

Run them where the package is installed next to vaeflow: `pytest tests/`.
"""

from itertools import permutations

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from vaeflow_example.gmm import (FitGMM, GaussianMixture, GaussianMixturePrior, fit_gmm, m_step,
                                  register_latent_priors, register_stages)

# a known 3-component mixture in 2-D, well separated, with axis-aligned covariances (so "diag" is well specified too)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 6.0]], dtype=torch.float64)
STDS = torch.tensor([[1.0, 0.5], [0.6, 1.2], [0.8, 0.8]], dtype=torch.float64)


def draw(n: int, seed: int = 0) -> torch.Tensor:
    """n latents (n, 2) from the known mixture."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)  # (n,)
    return MEANS[k] + STDS[k] * torch.randn(n, 2, generator=g, dtype=torch.float64)


def known_mixture() -> MixtureSameFamily:
    """The true density, by torch.distributions (independent of gmm.py)."""
    return MixtureSameFamily(Categorical(probs=WEIGHTS), Independent(Normal(MEANS, STDS), 1))


def best_match(fitted: torch.Tensor) -> tuple[int, ...]:
    """The permutation of the fitted components closest to MEANS."""
    return min(permutations(range(len(MEANS))), key=lambda p: (fitted[list(p)] - MEANS).norm().item())


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_a_known_mixture_and_never_lowers_the_likelihood(covariance):
    z = draw(4000)
    gmm, history = fit_gmm(z, 3, covariance, iterations=300, tolerance=0.0, regularization=0.0, seed=1)
    order = list(best_match(gmm.means))
    torch.testing.assert_close(gmm.means[order], MEANS, atol=0.1, rtol=0)
    torch.testing.assert_close(gmm.weights[order], WEIGHTS, atol=0.03, rtol=0)
    variances = gmm.covariances[order] if covariance == "diag" else gmm.covariances[order].diagonal(dim1=1, dim2=2)
    torch.testing.assert_close(variances.sqrt(), STDS, atol=0.08, rtol=0)
    assert gmm.weights.sum().item() == pytest.approx(1.0, abs=1e-12)

    # EM (Dempster et al. 1977): each iteration's log-likelihood is at least the previous one's (up to rounding)
    assert len(history) >= 3
    assert all(after >= before - 1e-10 for before, after in zip(history, history[1:])), history
    assert history[-1] > history[0]
    # the last entry is the returned mixture's, and a maximum-likelihood fit beats the true parameters on its sample
    assert gmm.log_prob(z).mean().item() == pytest.approx(history[-1], abs=1e-12)
    assert history[-1] >= known_mixture().log_prob(z).mean().item()


def test_the_fit_is_a_stationary_point_of_the_likelihood():
    """Two overlapping components (where hard assignments would be biased): at EM's fixed point the gradient of the
    mean log-likelihood, taken by autograd through torch.distributions, vanishes in every parameter."""
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(torch.tensor([0.6, 0.4]), 2000, replacement=True, generator=g)  # (N,)
    z = torch.tensor([[0.0, 0.0], [1.5, 1.0]], dtype=torch.float64)[k] + torch.randn(2000, 2, generator=g,
                                                                                     dtype=torch.float64)
    gmm, _ = fit_gmm(z, 2, "diag", iterations=3000, tolerance=1e-12, regularization=0.0)
    logits, means, stds = (t.clone().requires_grad_() for t in (gmm.weights.log(), gmm.means, gmm.covariances.sqrt()))
    density = MixtureSameFamily(Categorical(logits=logits), Independent(Normal(means, stds), 1))
    density.log_prob(z).mean().backward()
    for name, param in (("weights", logits), ("means", means), ("standard deviations", stds)):
        assert param.grad.abs().max().item() < 1e-5, (name, param.grad)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_one_component_is_the_closed_form_gaussian(covariance):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64) + 3
    reg = 1e-3
    gmm, history = fit_gmm(z, 1, covariance, iterations=10, regularization=reg, seed=5)
    sample_cov = torch.cov(z.T, correction=0)  # the maximum-likelihood (biased) covariance
    want = sample_cov.diagonal() + reg if covariance == "diag" else sample_cov + reg * torch.eye(4, dtype=z.dtype)
    torch.testing.assert_close(gmm.weights, torch.ones(1, dtype=z.dtype))
    torch.testing.assert_close(gmm.means[0], z.mean(0))
    torch.testing.assert_close(gmm.covariances[0], want)
    assert history[-1] == pytest.approx(history[0], abs=1e-12)  # already at the optimum: EM cannot move
    if covariance == "full":
        reference = MultivariateNormal(z.mean(0), covariance_matrix=want).log_prob(z).mean().item()
        assert history[-1] == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_log_prob_is_the_mixture_density_of_torch_distributions(covariance):
    g = torch.Generator().manual_seed(3)
    k, j = 4, 3
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    weights /= weights.sum()
    means = torch.randn(k, j, generator=g, dtype=torch.float64) * 2
    if covariance == "diag":
        covs = torch.rand(k, j, generator=g, dtype=torch.float64) + 0.2
        components = Independent(Normal(means, covs.sqrt()), 1)
    else:
        a = torch.randn(k, j, j, generator=g, dtype=torch.float64)
        covs = a @ a.transpose(1, 2) + 0.3 * torch.eye(j, dtype=torch.float64)
        components = MultivariateNormal(means, covariance_matrix=covs)
    gmm = GaussianMixture(weights, means, covs)
    z = torch.randn(50, j, generator=g, dtype=torch.float64) * 3
    reference = MixtureSameFamily(Categorical(probs=weights), components)
    torch.testing.assert_close(gmm.log_prob(z), reference.log_prob(z))
    assert gmm.joint_log_prob(z).shape == (50, k)


def test_samples_have_the_mixture_moments():
    cov = torch.diag_embed(STDS ** 2)  # (K, 2, 2)
    gmm = GaussianMixture(WEIGHTS, MEANS, cov)
    z = gmm.sample(40000, torch.Generator().manual_seed(0))  # (n, 2)
    mean = WEIGHTS @ MEANS  # E[z] = sum_k pi_k mu_k
    second = (WEIGHTS[:, None, None] * (cov + MEANS[:, :, None] * MEANS[:, None, :])).sum(0)  # E[z z^T]
    torch.testing.assert_close(z.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(z.T, correction=0), second - torch.outer(mean, mean), atol=0.15, rtol=0)
    diag = GaussianMixture(WEIGHTS, MEANS, STDS ** 2).sample(40000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(diag, z)  # the same draws: a diagonal Cholesky factor is the standard deviations


def test_save_and_load_round_trip(tmp_path):
    gmm, _ = fit_gmm(draw(300), 3, "full", iterations=5)
    gmm.save(tmp_path / "gmm.safetensors")
    back = GaussianMixture.load(tmp_path / "gmm.safetensors")
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(back, name), getattr(gmm, name))
    assert back.covariance == "full"


def test_fit_is_seeded_and_bad_arguments_are_errors():
    z = draw(300)
    a, history_a = fit_gmm(z, 3, "diag", iterations=20, seed=7)
    b, history_b = fit_gmm(z, 3, "diag", iterations=20, seed=7)
    assert history_a == history_b  # the same start, then the same iterations
    assert torch.equal(a.means, b.means) and torch.equal(a.covariances, b.covariances)
    starts = {fit_gmm(z, 3, "diag", iterations=0, seed=seed)[1][0] for seed in range(4)}
    assert len(starts) > 1  # the seed chooses the k-means++ start
    with pytest.raises(ValueError, match="components"):
        fit_gmm(z[:2], 3)
    with pytest.raises(ValueError, match="covariance"):
        fit_gmm(z, 2, "spherical")


def test_an_empty_component_stays_finite():
    """Responsibilities with a column of zeros: that component gets pi = 0 and mu = 0, and nothing turns NaN."""
    z = draw(100)
    resp = torch.zeros(100, 2, dtype=torch.float64)
    resp[:, 0] = 1
    gmm = m_step(z, resp, "full", 1e-6)
    assert gmm.weights.tolist() == [1.0, 0.0]
    assert torch.isfinite(gmm.means).all() and torch.isfinite(gmm.log_prob(z)).all()


def test_the_stage_registers_and_the_rae_names_it():
    from vaeflow.core.registry import get_registry

    seen = []
    register_stages(register=seen.append)
    assert seen == [FitGMM]
    registry = get_registry()
    entry = registry.get("stage", "fit_gmm")
    assert entry.cls is FitGMM and entry.package == "vaeflow-example", entry.source
    rae = registry.get("model", "rae").cls
    assert rae.stages == ("fit_gmm",) and "ex_post" in rae.watch_only
    assert set(FitGMM.inputs) == {"prepare_data", "train"}


# --- the mixture as a latent prior ---------------------------------------------------------------
def random_mixture(k: int, j: int, covariance: str, seed: int = 0) -> GaussianMixture:
    """A mixture with random weights, means and (well-conditioned) covariances, float64."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    means = 2 * torch.randn(k, j, generator=g, dtype=torch.float64)
    if covariance == "diag":
        covs = torch.rand(k, j, generator=g, dtype=torch.float64) + 0.2
    else:
        a = torch.randn(k, j, j, generator=g, dtype=torch.float64)
        covs = a @ a.transpose(1, 2) / j + 0.3 * torch.eye(j, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, covs)


def prior_of(mixture: GaussianMixture) -> GaussianMixturePrior:
    """A gmm prior holding `mixture`."""
    k, j = mixture.means.shape
    prior = GaussianMixturePrior(GaussianMixturePrior.Options(components=k, covariance=mixture.covariance), j)
    prior.load_mixture(mixture)
    return prior


def reference(mixture: GaussianMixture) -> MixtureSameFamily:
    """The same density, by torch.distributions (independent of gmm.py)."""
    if mixture.covariance == "diag":
        components = Independent(Normal(mixture.means, mixture.covariances.sqrt()), 1)
    else:
        components = MultivariateNormal(mixture.means, covariance_matrix=mixture.covariances)
    return MixtureSameFamily(Categorical(probs=mixture.weights), components)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_the_prior_density_is_torch_distributions_mixture(covariance):
    mixture = random_mixture(4, 3, covariance)
    prior = prior_of(mixture)
    z = 2 * torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # (2, 7, J)
    got = prior.log_prob(z)
    assert got.shape == (2, 7) and got.dtype == torch.float64
    torch.testing.assert_close(got, reference(mixture).log_prob(z))
    single = prior.log_prob(z[0, 0].float())  # (J,) -> (): returned in z's dtype
    assert single.shape == () and single.dtype == torch.float32
    torch.testing.assert_close(single, reference(mixture).log_prob(z[0, 0]).float())


def test_an_unfitted_prior_is_the_standard_normal():
    """Built, before any mixture is loaded: K equal copies of N(0, I), for both covariance kinds."""
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # (6, J)
    want = Independent(Normal(torch.zeros(5, dtype=torch.float64), 1.0), 1).log_prob(z)
    for covariance in ("full", "diag"):
        prior = GaussianMixturePrior(GaussianMixturePrior.Options(components=3, covariance=covariance), 5)
        torch.testing.assert_close(prior.log_prob(z), want)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_prior_samples_have_the_mixture_moments(covariance):
    mixture = random_mixture(3, 2, covariance, seed=4)
    prior = prior_of(mixture)
    cov = mixture.covariances if covariance == "full" else torch.diag_embed(mixture.covariances)  # (K, J, J)
    mean = mixture.weights @ mixture.means  # E[z] = sum_k pi_k mu_k
    outer = mixture.means[:, :, None] * mixture.means[:, None, :]  # (K, J, J) mu_k mu_k^T
    for t in (1.0, 0.5):  # temperature T scales each component's spread: Cov_k = T^2 Sigma_k
        second = (mixture.weights[:, None, None] * (t ** 2 * cov + outer)).sum(0)  # E[z z^T]
        z = prior.sample(40000, torch.Generator().manual_seed(0), t)  # (n, J)
        assert z.shape == (40000, 2) and z.dtype == torch.float32
        torch.testing.assert_close(z.double().mean(0), mean, atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(z.double().T, correction=0), second - torch.outer(mean, mean),
                                   atol=0.1, rtol=0)
    again = [prior.sample(5, torch.Generator().manual_seed(3)) for _ in range(2)]  # seeded on the CPU
    assert torch.equal(*again)
    draws = prior.sample(50, torch.Generator().manual_seed(3), 0.0)  # T = 0: every draw is a component's mean
    assert all(any(torch.equal(z, mu) for mu in mixture.means.float()) for z in draws)


def test_a_state_dict_round_trip_gives_the_same_prior():
    mixture = random_mixture(5, 3, "full", seed=7)
    fitted = prior_of(mixture)
    state = fitted.state_dict()
    assert set(state) == {"weights", "means", "covariances"}  # buffers: saved and loaded with the model's weights
    fresh = GaussianMixturePrior(GaussianMixturePrior.Options(components=5), 3)
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(8))  # (20, J)
    assert not torch.allclose(fresh.log_prob(z), fitted.log_prob(z))  # the mixture is not in the constructor
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_prob(z), fitted.log_prob(z))
    assert torch.equal(*(p.sample(10, torch.Generator().manual_seed(1)) for p in (fresh, fitted)))


def test_loading_a_mixture_of_another_shape_is_an_error():
    prior = GaussianMixturePrior(GaussianMixturePrior.Options(components=4, covariance="diag"), 3)
    with pytest.raises(ValueError, match=r"covariances have shape \(4, 3, 3\).*holds \(4, 3\)"):
        prior.load_mixture(random_mixture(4, 3, "full"))
    with pytest.raises(ValueError, match="means"):
        prior.load_mixture(random_mixture(4, 2, "diag"))


def test_the_prior_registers():
    from vaeflow.core.registry import get_registry

    seen = []
    register_latent_priors(register=seen.append)
    assert seen == [GaussianMixturePrior]
    entry = get_registry().get("latent_prior", "gmm")
    assert entry.cls is GaussianMixturePrior and entry.package == "vaeflow-example", entry.source


# --- the refined model the stage writes ----------------------------------------------------------
def test_the_refined_run_dir_is_the_trained_model_with_the_mixture_as_its_prior(tiny_config, tmp_path):
    """write_refined on a tiny RAE: load_model reads the run dir back; every weight but the prior's is the trained
    model's, the prior holds the mixture, generate() decodes the mixture's draws, and the registered model's
    requirements pin this package for the gmm prior too. The trained config is left as it was."""
    import json

    from vaeflow.core.checkpoint import load_model, plugins_used
    from vaeflow.core.config import validate
    from vaeflow.core.model import build_model
    from vaeflow.pipelines.registry import requirements
    from vaeflow_example.gmm import refined_config, write_refined

    cfg = validate(tiny_config)
    torch.manual_seed(0)
    trained = build_model(cfg).eval()
    mixture = random_mixture(3, 4, "full", seed=5)
    refined_cfg = refined_config(cfg, cfg.model.ex_post.model_copy(update={"components": 3}))
    assert refined_cfg.model.prior.name == "gmm" and cfg.model.prior.name == "standard-normal"
    write_refined(trained, refined_cfg, mixture, tmp_path / "model")

    model, loaded_cfg = load_model(tmp_path / "model")
    assert isinstance(model.prior, GaussianMixturePrior) and loaded_cfg == refined_cfg
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(model.prior, name), getattr(mixture, name)), name
    state, want = model.state_dict(), trained.state_dict()
    assert set(state) - set(want) == {"prior.weights", "prior.means", "prior.covariances"}
    for name, value in want.items():
        assert torch.equal(state[name], value), name

    images = model.generate(6, torch.Generator().manual_seed(2))  # (6, C, H, W)
    z = mixture.sample(6, torch.Generator().manual_seed(2)).float()  # (6, J): the same draws
    with torch.no_grad():
        torch.testing.assert_close(images, trained.likelihood.mean(trained.decode(z)))

    plugins = json.loads((tmp_path / "model" / "plugins.json").read_text())
    assert plugins["prior"]["name"] == "gmm" and plugins["prior"]["package"] == "vaeflow-example"
    assert plugins_used(refined_cfg)["prior"]["package"] == "vaeflow-example"
    assert "vaeflow-example==0.1.0" in requirements(refined_cfg)
