"""The VampPrior (plugins/vamp.py) and the MMD kinds info-vae and wae-mmd (plugins/mmd.py): hand-computed mixture
densities and MMD values, closed-form moments and kernel expectations, reductions to the plain VAE and AE, and the
binding pitfalls (state dict, deepcopy, dtype moves, round trips, an unbound prior)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vaeflow.core import testing
from vaeflow.core.config import apply_sets, load_config, validate
from vaeflow.core.distributions import DiagonalGaussian, standard_normal_log_prob
from vaeflow.core.errors import ConfigError
from vaeflow.core.model import build_model
from vaeflow.plugins.decoders import MLPDecoder
from vaeflow.plugins.encoders import MLPEncoder
from vaeflow.plugins.likelihoods import Bernoulli
from vaeflow.plugins.mmd import mmd
from vaeflow.plugins.models import AE, VAE
from vaeflow.plugins.vamp import VampPrior

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vae-shapes-tiny.yaml"
LOG_2PI = math.log(2 * math.pi)


def normal_pdf(z: float, mean: float, std: float) -> float:
    """N(z; mean, std^2), written out."""
    return math.exp(-0.5 * ((z - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


# --- hand-built models: one pixel in, a linear encoder whose weights are set by hand -------------
def pixel_vae(weight: list[list[float]], bias: list[float], pseudo_inputs: list[float], cls=VAE) -> VAE:
    """A VAE on 1x1 images whose posterior parameters are weight @ [x] + bias (2J of them, J of them for an AE),
    with a VampPrior over the given pixel values as pseudo-inputs."""
    j = len(bias) // (2 if cls.variational else 1)
    encoder = MLPEncoder(MLPEncoder.Options(hidden=[]), (1, 1, 1), len(bias))  # one Linear(1, 2J)
    with torch.no_grad():
        encoder.net[0].weight.copy_(torch.tensor(weight))  # (2J, 1)
        encoder.net[0].bias.copy_(torch.tensor(bias))  # (2J,)
    prior = VampPrior(VampPrior.Options(components=len(pseudo_inputs)), j)
    model = cls(encoder, MLPDecoder(MLPDecoder.Options(hidden=[4]), j, (1, 1, 1)), Bernoulli(Bernoulli.Options(),
                (1, 1, 1)), prior, j)
    with torch.no_grad():
        prior.idle_weight.copy_(torch.tensor(pseudo_inputs).view(-1, 1, 1, 1))  # (K, 1, 1, 1), inside [0, 1]
    return model


LN2 = math.log(2.0)
# u_1 = 0.25 -> q = N(-1, 1); u_2 = 0.75 -> q = N(1, 2^2): mean 4u - 2, log-variance 4 ln2 u - ln2.
TWO_COMPONENTS = dict(weight=[[4.0], [4 * LN2]], bias=[-2.0, -LN2], pseudo_inputs=[0.25, 0.75])


def test_vamp_with_one_standard_normal_component_is_the_standard_normal():
    model = pixel_vae(weight=[[0.0]] * 6, bias=[0.0] * 6, pseudo_inputs=[0.4])  # q(z|u) = N(0, I_3)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))  # (5, J)
    z3 = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2))  # (k, B, J), the IWAE shape
    torch.testing.assert_close(model.prior.log_prob(z), standard_normal_log_prob(z), atol=1e-6, rtol=0)
    torch.testing.assert_close(model.prior.log_prob(z3), standard_normal_log_prob(z3), atol=1e-6, rtol=0)
    assert model.prior.log_prob(z3).shape == (4, 5)
    # sampling: one component index, then T * eps from the same generator (the documented draw order)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(torch.randint(1, (7,), generator=g), torch.zeros(7, dtype=torch.long))
    eps = torch.randn(7, 3, generator=g)  # (n, J)
    got = model.prior.sample(7, torch.Generator().manual_seed(3), 0.5)
    torch.testing.assert_close(got, 0.5 * eps, atol=1e-6, rtol=0)


def test_vamp_two_component_density_by_hand():
    model = pixel_vae(**TWO_COMPONENTS)
    q = model.prior.components()
    torch.testing.assert_close(q.mean.squeeze(1), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(q.std.squeeze(1), torch.tensor([1.0, 2.0]))
    for z in (0.0, -1.5, 2.0, 7.0):
        want = math.log(0.5 * normal_pdf(z, -1.0, 1.0) + 0.5 * normal_pdf(z, 1.0, 2.0))
        got = model.prior.log_prob(torch.tensor([[z]])).item()
        assert got == pytest.approx(want, abs=1e-5), z


def test_vamp_two_dimensional_density_by_hand():
    # J = 2: mean (4u - 2, 2 - 4u), log-variance (0, 0) -> components N((-1, 1), I) and N((1, -1), I)
    model = pixel_vae(weight=[[4.0], [-4.0], [0.0], [0.0]], bias=[-2.0, 2.0, 0.0, 0.0], pseudo_inputs=[0.25, 0.75])
    z = torch.tensor([[0.5, 0.5], [-1.0, 1.0], [3.0, -2.0]])  # (3, 2)
    for row, (a, b) in zip(model.prior.log_prob(z), z.tolist()):
        first, second = normal_pdf(a, -1, 1) * normal_pdf(b, 1, 1), normal_pdf(a, 1, 1) * normal_pdf(b, -1, 1)
        want = math.log(0.5 * first + 0.5 * second)
        assert row.item() == pytest.approx(want, abs=1e-5)
    # leading dimensions are batch dimensions: (k, B, J) gives each slice's (B,) values
    z3 = torch.stack([z, z.flip(0)])  # (2, 3, 2)
    torch.testing.assert_close(model.prior.log_prob(z3), torch.stack([model.prior.log_prob(z),
                                                                      model.prior.log_prob(z.flip(0))]))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_vamp_sample_moments_match_the_mixture(temperature):
    """Mixture of N(-1, T^2) and N(1, 4 T^2) with weights 1/2: mean 0, variance 1 + T^2 (1 + 4) / 2."""
    model = pixel_vae(**TWO_COMPONENTS)
    n = 200_000
    s = model.prior.sample(n, torch.Generator().manual_seed(0), temperature).squeeze(1).double()  # (n,)
    var = 1.0 + temperature**2 * 2.5
    fourth = 0.5 * (1 + 6 * temperature**2 + 3 * temperature**4) + 0.5 * (1 + 24 * temperature**2 + 48 * temperature**4)
    assert abs(s.mean().item()) < 5 * math.sqrt(var / n)
    assert abs(s.pow(2).mean().item() - var) < 5 * math.sqrt((fourth - var**2) / n)
    # P(z < 0) = Phi(1 / T) / 2 + Phi(-1 / (2T)) / 2: the two components are picked equally often
    phi = lambda a: 0.5 * (1 + math.erf(a / math.sqrt(2)))  # noqa: E731
    want = 0.5 * phi(1 / temperature) + 0.5 * phi(-1 / (2 * temperature))
    assert (s < 0).double().mean().item() == pytest.approx(want, abs=0.005)


def test_vamp_kl_is_the_monte_carlo_estimate_and_has_no_closed_form():
    model = pixel_vae(**TWO_COMPONENTS)
    q = DiagonalGaussian(torch.tensor([[0.3, -0.2], [-1.0, 0.4]]))  # (B, 2J), J = 1
    z = torch.tensor([[0.1], [-0.7]])  # (B, J)
    torch.testing.assert_close(model.prior.kl(q, z), q.log_prob(z) - model.prior.log_prob(z))
    assert model.prior.kl_per_dim(q) is None


def test_an_unbound_vamp_says_it_needs_a_model():
    prior = VampPrior(VampPrior.Options(), 4)
    for call in (lambda: prior.log_prob(torch.zeros(2, 4)), lambda: prior.sample(3), lambda: prior.pseudo_inputs):
        with pytest.raises(RuntimeError, match=r"vamp: .*needs a model.*model.prior: \{name: vamp\}.*bind"):
            call()
    assert list(prior.state_dict()) == []  # the pseudo-inputs are made for the data shape when it is bound


def test_vamp_of_a_point_posterior_samples_codes_and_has_no_density():
    model = pixel_vae(weight=[[2.0]], bias=[1.0], pseudo_inputs=[0.0, 0.5, 1.0], cls=AE)  # codes 1, 2, 3
    s = model.prior.sample(300, torch.Generator().manual_seed(0))  # (300, 1)
    assert set(s.squeeze(1).tolist()) == {1.0, 2.0, 3.0}
    with pytest.raises(RuntimeError, match="point posterior"):
        model.prior.log_prob(torch.zeros(1, 1))


# --- the VampPrior in a built model: the binding pitfalls --------------------------------------
def vamp_config(components: int = 5, kind: str = "vae"):
    """A small MLP model with a VampPrior on 16x16 shapes."""
    return validate({
        "data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 64, "n_test": 16}},
        "model": {"kind": kind, "latent_dim": 3, "encoder": {"name": "mlp", "hidden": [32]},
                  "decoder": {"name": "mlp", "hidden": [32]}, "likelihood": {"name": "bernoulli"},
                  "prior": {"name": "vamp", "components": components}},
    })


def built(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_model(vamp_config(**kw))


def test_the_encoder_is_saved_once_and_the_pseudo_inputs_with_the_prior():
    model = built()
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("prior.")] == ["prior.idle_weight"]
    assert model.state_dict()["prior.idle_weight"].shape == (5, 1, 16, 16)  # (K, C, H, W)
    assert len(keys) == len(set(keys)) == len(list(model.named_parameters()))  # no tensor under two names
    assert not any(name.startswith("prior.") and name != "prior" for name, _ in model.named_modules())
    assert model.prior.model is model
    # initialised inside (0, 1), where the hard-tanh passes gradients (N(0.05, 0.01^2))
    u = model.prior.idle_weight
    assert 0 < u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.05, abs=0.002)


def test_a_deep_copy_uses_its_own_encoder():
    model = built()
    z = torch.randn(4, 3)
    before = model.prior.log_prob(z)
    clone = copy.deepcopy(model)
    assert clone.prior.model is clone and clone.prior.model.encoder is not model.encoder
    torch.testing.assert_close(clone.prior.log_prob(z), before, atol=0, rtol=0)
    with torch.no_grad():
        clone.encoder.net[-1].bias.add_(0.5)  # moves every component's mean and log-variance
    assert not torch.allclose(clone.prior.log_prob(z), before)
    torch.testing.assert_close(model.prior.log_prob(z), before, atol=0, rtol=0)  # the original is untouched


def test_load_state_dict_round_trip_and_dtype_move():
    model = built(seed=0)
    other = built(seed=1)
    z = torch.randn(2, 6, 3)  # (k, B, J)
    assert not torch.allclose(other.prior.log_prob(z), model.prior.log_prob(z))
    other.load_state_dict(model.state_dict())
    torch.testing.assert_close(other.prior.log_prob(z), model.prior.log_prob(z), atol=0, rtol=0)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(other.prior.sample(8, g()), model.prior.sample(8, g()), atol=0, rtol=0)
    # .to() reaches the pseudo-inputs (a parameter of the prior) and the bound model is the moved one
    wide = copy.deepcopy(model).to(torch.float64)
    assert wide.prior.idle_weight.dtype == torch.float64 and wide.prior.model is wide
    torch.testing.assert_close(wide.prior.log_prob(z.double()), model.prior.log_prob(z).double(), atol=1e-5, rtol=1e-5)


def test_vamp_trains_its_pseudo_inputs_and_serves_the_iwae_path():
    model = built()
    x = torch.rand(4, 1, 16, 16)
    out = model(x)
    (out.terms["reconstruction"] + out.terms["kl"]).backward()
    assert model.prior.idle_weight.grad is not None and model.prior.idle_weight.grad.abs().sum() > 0
    assert model.log_joint_terms(x, 3).shape == (3, 4)  # log p(z) of (k, B, J) draws
    state = torch.get_rng_state()
    a = model.generate(3, torch.Generator().manual_seed(0))
    assert torch.equal(a, model.generate(3, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)  # sampling reads only the generator


def test_vamp_passes_the_latent_prior_kit():
    """The kit binds every latent prior to a tiny continuous model first, as a model does (LatentPrior.bind)."""
    testing.check_latent_prior(VampPrior, options={"components": 10})


def test_a_vae_with_vamp_passes_the_model_kit():
    testing.check_model(ROOT / "configs" / "vamp-shapes-tiny.yaml", steps=2)


# --- the MMD ----------------------------------------------------------------------------------
def test_unbiased_mmd_by_hand_in_one_dimension():
    """x = {0, 1}, y = {0, 2}, J = 1, C = 2: squared distances xx 1, yy 4, xy (0, 4, 1, 1)."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    # IMQ 2 / (2 + d^2): within x 2/3, within y 1/3, across (1 + 1/3 + 2/3 + 2/3) / 4 = 2/3 -> 2/3 + 1/3 - 4/3
    assert mmd(x, y, "imq", 1.0).item() == pytest.approx(-1 / 3, abs=1e-6)
    # RBF exp(-d^2 / 2): e^-1/2 + e^-2 - 2 (1 + e^-2 + 2 e^-1/2) / 4 = (e^-2 - 1) / 2
    assert mmd(x, y, "rbf", 1.0).item() == pytest.approx((math.exp(-2) - 1) / 2, abs=1e-6)
    assert mmd(x, y).item() == mmd(y, x).item()  # symmetric


def test_unbiased_mmd_by_hand_in_two_dimensions_with_a_scale():
    """x = {(0,0), (1,1)}, y = {(0,0), (2,0)}, J = 2, sigma^2 = 0.5 so C = 2 J sigma^2 = 2."""
    x, y = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # IMQ: within x 2/4, within y 2/6, across (1 + 1/3 + 1/2 + 1/2) / 4 = 7/12 -> 1/2 + 1/3 - 7/6
    assert mmd(x, y, "imq", 0.5).item() == pytest.approx(-1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 points"):
        mmd(x[:1], y)


def expected_rbf_mmd(shift: float, j: int, c: float) -> float:
    """E of the unbiased MMD^2 between N(0, I_J) and N(shift e_1, I_J) with k = exp(-||x-y||^2 / C): for w = x - y ~
    N(m, 2 I), E exp(-||w||^2 / C) = (1 + 4 / C)^(-J/2) exp(-||m||^2 / (C + 4))."""
    base = (1 + 4 / c) ** (-j / 2)
    return 2 * base * (1 - math.exp(-shift**2 / (c + 4)))


@pytest.mark.parametrize("shift", [0.0, 1.0, 2.0])
def test_unbiased_mmd_matches_the_gaussian_closed_form(shift):
    j, n, repeats = 2, 32, 400
    g = torch.Generator().manual_seed(int(10 * shift))
    offset = torch.tensor([shift, 0.0])  # (J,)
    draws = [(torch.randn(n, j, generator=g), torch.randn(n, j, generator=g) + offset) for _ in range(repeats)]
    values = torch.tensor([mmd(x, y, "rbf", 1.0).item() for x, y in draws], dtype=torch.float64)  # (repeats,)
    want = expected_rbf_mmd(shift, j, c=2 * j * 1.0)
    se = values.std().item() / math.sqrt(repeats)
    assert abs(values.mean().item() - want) < 5 * se, (values.mean().item(), want, se)
    if shift > 0:
        assert values.mean().item() > 10 * se  # clearly positive for shifted Gaussians


# --- info-vae and wae-mmd -----------------------------------------------------------------------
def kind_config(kind: str, *sets: str):
    """vae-shapes-tiny as another kind, on a tiny dataset."""
    return apply_sets(load_config(TINY), [f"model.kind={kind}", "data.dataset.n_train=64", "data.dataset.n_test=16",
                                          *sets])


def seeded(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def weighted_loss(out) -> torch.Tensor:
    """The engine's loss at beta = 1: sum_k weights[k] * term_k."""
    return sum(out.weights.get(name, 1.0) * term for name, term in out.terms.items())


def test_info_vae_with_alpha_0_and_lambda_1_is_the_vae():
    info = seeded(kind_config("info-vae", "model.alpha=0", "model.lambda_=1"))
    vae = seeded(kind_config("vae"))
    assert list(info.state_dict()) == list(vae.state_dict())
    for key, value in vae.state_dict().items():
        assert torch.equal(info.state_dict()[key], value), key
    x = torch.rand(8, 1, 32, 32)
    torch.manual_seed(3)
    out_info = info(x)
    torch.manual_seed(3)
    out_vae = vae(x)
    assert out_info.weights == {"kl": 1.0, "mmd": 0.0}
    assert torch.equal(out_info.terms["reconstruction"], out_vae.terms["reconstruction"])
    assert torch.equal(out_info.terms["kl"], out_vae.terms["kl"])
    torch.testing.assert_close(weighted_loss(out_info), weighted_loss(out_vae), atol=0, rtol=0)
    assert info.capabilities.log_likelihood == "bound" and info.scheduled == "kl"


def test_info_vae_weights_and_mmd_term():
    model = seeded(kind_config("info-vae", "model.alpha=0.5", "model.lambda_=2", "model.kernel=rbf",
                               "model.kernel_scale=2"))
    x = torch.rand(6, 1, 32, 32)
    torch.manual_seed(7)
    out = model(x)
    assert out.weights == {"kl": 0.5, "mmd": 1.5}  # 1 - alpha, alpha + lambda - 1
    torch.manual_seed(7)  # the same draws by hand: z ~ q(z|x), then B standard-normal prior draws
    z = model.posterior(x).rsample()  # (B, J)
    target = torch.randn(6, 8)  # (B, J)
    torch.testing.assert_close(out.terms["mmd"], mmd(z, target, "rbf", 2.0))


def test_info_vae_rejects_a_negative_mmd_or_kl_weight():
    with pytest.raises((ConfigError, ValidationError), match=r"alpha \+ lambda_ - 1"):
        kind_config("info-vae", "model.alpha=0", "model.lambda_=0.5")
    with pytest.raises((ConfigError, ValidationError), match="alpha"):
        kind_config("info-vae", "model.alpha=1.5")


def test_wae_mmd_with_weight_0_is_the_ae():
    wae = seeded(kind_config("wae-mmd", "model.mmd_weight=0"))
    ae = seeded(kind_config("ae"))
    for key, value in ae.state_dict().items():
        assert torch.equal(wae.state_dict()[key], value), key
    x = torch.rand(8, 1, 32, 32)
    torch.manual_seed(3)
    out_wae = wae(x)
    out_ae = ae(x)
    assert out_wae.weights == {"mmd": 0.0} and set(out_wae.terms) == {"reconstruction", "mmd"}
    assert torch.equal(out_wae.terms["reconstruction"], out_ae.terms["reconstruction"])
    torch.testing.assert_close(weighted_loss(out_wae), weighted_loss(out_ae), atol=0, rtol=0)
    # the codes are the deterministic encoder's output, compared with N(0, I) draws from the global RNG
    torch.manual_seed(3)
    torch.testing.assert_close(out_wae.terms["mmd"], mmd(wae.encoder(x), torch.randn(8, 8), "imq", 1.0))
    assert wae.capabilities.log_likelihood is None and wae.scheduled is None


def test_mmd_kinds_handle_a_batch_of_one_and_a_vamp_prior():
    wae = seeded(kind_config("wae-mmd"))
    out = wae(torch.rand(1, 1, 32, 32))
    assert out.terms["mmd"].item() == 0.0  # no unbiased estimate from one code: no contribution
    weighted_loss(out).backward()
    # info-vae with a VampPrior: the MMD's prior draws come from the mixture and train the pseudo-inputs
    info = seeded(kind_config("info-vae", "model.prior={name: vamp, components: 4}", "model.alpha=1"))
    out = info(torch.rand(5, 1, 32, 32))
    assert out.weights == {"kl": 0.0, "mmd": 1000.0}
    weighted_loss(out).backward()
    assert info.prior.idle_weight.grad.abs().sum() > 0
