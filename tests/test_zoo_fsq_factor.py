"""The model zoo's fsq quantizer (Mentzer et al. 2023) and factor-vae kind (Kim & Mnih 2018), checked against hand
computations: the FSQ grids and mixed-radix indices written out, the straight-through and bound gradients in closed
form, the discriminator's cross-entropy on chosen logits, permutation invariants, and the plain VAE's loss."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vaeflow.core import testing
from vaeflow.core.config import apply_sets, load_config, validate
from vaeflow.core.model import build_model
from vaeflow.plugins.factor_vae import FactorVAE, discriminator_loss, halves, permute_dims
from vaeflow.plugins.fsq import FSQ, bound, codes_to_indices, indices_to_codes, round_ste

from conftest import ROOT

FSQ_TINY = ROOT / "configs" / "fsq-shapes-tiny.yaml"
FACTOR_TINY = ROOT / "configs" / "factor-vae-shapes-tiny.yaml"


def fsq(levels: list[int], embedding_dim: int | None = None) -> FSQ:
    """An fsq quantizer; embedding_dim = len(levels) (the default) has no projections."""
    return FSQ(FSQ.Options(levels=levels), embedding_dim or len(levels))


def normalised(z: torch.Tensor, level: int) -> torch.Tensor:
    """One channel of L levels: round_ste(f(z)) / floor(L/2), z (N, 1) -> (N, 1)."""
    return round_ste(bound(z, torch.tensor([level]))) / (level // 2)


# --- fsq: codebook size and the index <-> code bijection ---------------------------------------
@pytest.mark.parametrize("levels, k", [([8, 6, 5], 240), ([8, 5, 5, 5], 1000), ([7, 5, 5, 5, 5], 4375),
                                       ([8, 8, 8, 6, 5], 15360), ([8, 8, 8, 5, 5, 5], 64000), ([5, 5, 5], 125)])
def test_codebook_size_is_the_product_of_the_levels(levels, k):
    """Table 1's sets and the tiny config's: K = prod(L_i), multiplied out by hand."""
    assert FSQ.Options(levels=levels).codebook_size == k
    q = FSQ(FSQ.Options(levels=levels), 8)
    assert q.codebook_size == k
    assert q.codebook.shape == (k, 8)


def test_options_take_levels_only():
    assert FSQ.Options().levels == [8, 5, 5, 5] and FSQ.Options().codebook_size == 1000
    with pytest.raises(ValidationError, match="extra"):
        FSQ.Options(codebook_size=1000)  # K follows from the levels; it is not a key
    with pytest.raises(ValidationError, match="greater than or equal to 3"):
        FSQ.Options(levels=[2, 5])  # L = 2 leaves the even-L offset outside the bound
    with pytest.raises(ValidationError):
        FSQ.Options(levels=[])


@pytest.mark.parametrize("levels", [[3, 4], [8, 5, 5, 5], [8, 6, 5], [7, 5, 5, 5, 5]])
def test_every_index_round_trips_through_its_code(levels):
    levels_t = torch.tensor(levels)
    k = math.prod(levels)
    codes = indices_to_codes(torch.arange(k), levels_t)  # (K, d)
    assert codes.shape == (k, len(levels))
    assert torch.equal(codes_to_indices(codes, levels_t), torch.arange(k))
    assert len(torch.unique(codes, dim=0)) == k  # K distinct codes: a bijection with the grid
    for i, level in enumerate(levels):  # each channel takes exactly its L grid values
        half = level // 2
        want = torch.tensor([(v - half) / half for v in range(level)])
        assert torch.equal(torch.unique(codes[:, i]), want)


def test_mixed_radix_index_by_hand():
    """levels [3, 4]: basis (1, 3); channel 0 in {-1, 0, 1} has digit = code + 1, channel 1 in {-1, -1/2, 0, 1/2}
    has digit = 2 code + 2."""
    levels = torch.tensor([3, 4])
    codes = torch.tensor([[-1.0, -1.0], [1.0, -0.5], [0.0, 0.0], [1.0, 0.5]])
    # digits (0, 0) -> 0; (2, 1) -> 2 + 3 = 5; (1, 2) -> 1 + 6 = 7; (2, 3) -> 2 + 9 = 11 = K - 1
    assert codes_to_indices(codes, levels).tolist() == [0, 5, 7, 11]
    assert torch.equal(indices_to_codes(torch.tensor([0, 5, 7, 11]), levels), codes)


# --- fsq: the rounding grid and the straight-through gradient ------------------------------------
@pytest.mark.parametrize("level, grid", [
    (3, [-1.0, 0.0, 1.0]),
    (5, [-1.0, -0.5, 0.0, 0.5, 1.0]),  # odd L: symmetric, {-2, ..., 2} / 2
    (4, [-1.0, -0.5, 0.0, 0.5]),  # even L: the half-step offset gives {-2, ..., 1} / 2
    (8, [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]),  # {-4, ..., 3} / 4
])
def test_rounding_grid_values(level, grid):
    z = torch.linspace(-12, 12, 24001)[:, None]  # (N, 1)
    values = normalised(z, level).flatten()  # (N,)
    assert torch.unique(values).tolist() == grid
    assert bool((values.diff() >= 0).all())  # f is increasing, so the codes are in order
    assert normalised(torch.zeros(1, 1), level).item() == 0.0  # z = 0 lands on the code 0
    assert normalised(torch.full((1, 1), -30.0), level).item() == -1.0
    assert normalised(torch.full((1, 1), 30.0), level).item() == grid[-1]


def test_rounding_thresholds_by_hand():
    """Where the code changes: f(z) crosses a half-integer.

    L = 5: f(z) = 1.998 tanh(z) = 1/2 at z = atanh(0.5 / 1.998) = 0.2557.
    L = 4: f(z) = 1.4985 tanh(z + s) - 1/2 with s = atanh(0.5 / 1.4985) = 0.3469; f(z) = -1/2 at z = -0.3469 and
    f(z) = 1/2 at z = atanh(1 / 1.4985) - s = 0.8059 - 0.3469 = 0.4590."""
    five = normalised(torch.tensor([[0.25], [0.26], [-0.25], [-0.26]]), 5).flatten()
    assert five.tolist() == [0.0, 0.5, 0.0, -0.5]
    four = normalised(torch.tensor([[-0.36], [-0.34], [0.45], [0.47]]), 4).flatten()
    assert four.tolist() == [-0.5, 0.0, 0.0, 0.5]


def test_straight_through_rounding_has_an_identity_gradient():
    bounded = torch.tensor([-1.7, -0.2, 0.4, 1.5, 2.49], requires_grad=True)
    out = round_ste(bounded)
    assert out.tolist() == [-2.0, 0.0, 0.0, 2.0, 2.0]  # round half to even: 1.5 -> 2
    weights = torch.tensor([1.0, -2.0, 3.0, 0.5, 7.0])
    (out * weights).sum().backward()
    assert torch.equal(bounded.grad, weights)  # d round_ste(b) / db = 1


def test_quantizer_gradient_is_the_bounds_derivative():
    """With no projection (D = d), d z_hat / d z = f'(z) / floor(L/2) = half_l (1 - tanh^2(z + s)) / floor(L/2)."""
    levels = [5, 4]
    q = fsq(levels)
    z = torch.tensor([0.3, -1.2, 0.0, 2.0, 0.7, -0.1]).view(1, 2, 1, 3).requires_grad_(True)  # (1, 2, 1, 3)
    q(z).quantized.sum().backward()
    half_l = {5: 4 * 0.999 / 2, 4: 3 * 0.999 / 2}
    shift = {5: 0.0, 4: math.atanh(0.5 / half_l[4])}
    want = torch.tensor([[half_l[lv] * (1 - math.tanh(v + shift[lv]) ** 2) / (lv // 2) for v in row]
                         for lv, row in zip(levels, z.detach().view(2, 3).tolist())]).view(1, 2, 1, 3)
    torch.testing.assert_close(z.grad, want)


# --- fsq: the quantizer's outputs ----------------------------------------------------------------
@pytest.mark.parametrize("embedding_dim", [4, 8])  # 4 = d: no projection; 8: projected D -> d -> D
@pytest.mark.parametrize("training", [True, False])
def test_lookup_of_indices_is_quantized(embedding_dim, training):
    torch.manual_seed(0)
    q = fsq([8, 5, 5, 5], embedding_dim).train(training)
    z_e = 2 * torch.randn(3, embedding_dim, 4, 5)
    out = q(z_e)
    assert out.quantized.shape == (3, embedding_dim, 4, 5) and out.indices.shape == (3, 4, 5)
    assert out.indices.dtype == torch.int64 and 0 <= out.indices.min() and out.indices.max() < 1000
    assert out.losses == {}  # FSQ has no codebook or commitment loss
    torch.testing.assert_close(q.lookup(out.indices), out.quantized, atol=1e-6, rtol=0)
    if embedding_dim == 4:  # without projections the codes are the grid values themselves
        assert torch.equal(q.lookup(out.indices), out.quantized)
        assert torch.equal(q.codebook, indices_to_codes(torch.arange(1000), torch.tensor([8, 5, 5, 5])))


def test_perplexity_and_usage_by_hand():
    """levels [3, 3], no projection: 4 positions on codes (1, 1), (1, 1), (-1, 0), (0, -1) -> counts 2, 1, 1 of K = 9:
    perplexity exp(-(1/2 ln 1/2 + 2 (1/4) ln 1/4)) = 2^1.5, usage 3/9."""
    q = fsq([3, 3])
    z_e = torch.tensor([[9.0, 9.0], [9.0, 9.0], [-9.0, 0.0], [0.0, -9.0]]).T.reshape(1, 2, 2, 2)  # (1, 2, 2, 2)
    out = q(z_e)
    # index = digit_0 + 3 digit_1, digit = code + 1: (2, 2) -> 8, (0, 1) -> 3, (1, 0) -> 1
    assert out.indices.flatten().tolist() == [8, 8, 3, 1]
    assert out.stats["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-6)
    assert out.stats["usage"].item() == pytest.approx(3 / 9, rel=1e-6)


def test_fsq_plugs_into_both_vq_kinds():
    """The tiny fsq VQ-VAE-2 and its one-level VQ-VAE: K = 125 per level, reconstruction the only term, and the
    conformance kit's model check (objective, codes, priors' sampling, round trip, 2 training steps)."""
    cfg = load_config(FSQ_TINY)
    one_level = apply_sets(cfg, ["model.kind=vqvae", "model.vq.strides=[4]", "prior.bottom=null"])
    for config, levels in ((cfg, {"top", "bottom"}), (one_level, {"top"})):
        torch.manual_seed(0)
        model = build_model(config)
        assert model.codebook_sizes == {level: 125 for level in levels}
        out = model(torch.rand(2, 1, 32, 32))
        assert set(out.terms) == {"reconstruction"}
        assert set(out.stats) == {f"{lv}/{s}" for lv in levels for s in ("perplexity", "usage")}
        testing.check_model(config, steps=2)


# --- factor-vae ----------------------------------------------------------------------------------
def small_config(kind: str = "factor-vae", **model) -> dict:
    """A tiny MLP model on 16x16 shapes; factor-vae options go in `model`."""
    return validate({
        "data": {"dataset": {"name": "shapes", "image_size": 16, "n_train": 32, "n_test": 8}},
        "model": {"kind": kind, "latent_dim": 3, "encoder": {"name": "mlp", "hidden": [16]},
                  "decoder": {"name": "mlp", "hidden": [16]}, "likelihood": {"name": "bernoulli"}, **model},
    })


def factor_vae(**model) -> FactorVAE:
    """The small factor-vae, a discriminator of 2 layers of 8, built under seed 0."""
    torch.manual_seed(0)
    return build_model(small_config(discriminator_hidden=[8, 8], **model))


def images(n: int = 6) -> torch.Tensor:
    """n fixed images (n, 1, 16, 16) in [0, 1)."""
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def weighted_loss(out) -> torch.Tensor:
    """What the engine minimises (the constant beta schedule: kl weighted 1)."""
    return sum(out.weights.get(name, 1.0) * term for name, term in out.terms.items())


def test_factor_vae_options():
    opts = FactorVAE.Options(latent_dim=4)
    assert opts.discriminator_hidden == [1000] * 6  # the paper's discriminator
    assert opts.discriminator_activation == "leaky_relu"
    with pytest.raises(ValidationError):
        FactorVAE.Options(latent_dim=4, gamma=-1.0)
    with pytest.raises(ValidationError):
        FactorVAE.Options(latent_dim=4, discriminator_hidden=[])


def test_gamma_zero_leaves_the_plain_vae_loss():
    """Same weights, same draw: reconstruction and KL are the VAE's; the loss less D's cross-entropy is the VAE's."""
    model = factor_vae(gamma=0.0)
    torch.manual_seed(5)
    vae = build_model(small_config(kind="vae"))
    missing, unexpected = vae.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("discriminator.") for k in unexpected)
    x = images()
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    plain = vae(x)
    assert set(plain.terms) == {"reconstruction", "kl"}
    for name in ("reconstruction", "kl"):
        assert torch.equal(out.terms[name], plain.terms[name])
    assert out.weights == {"tc": 0.0}
    torch.testing.assert_close(weighted_loss(out) - out.terms["discriminator"], weighted_loss(plain))


def test_tc_gradient_reaches_the_encoder_only():
    model = factor_vae()
    model(images()).terms["tc"].backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # TC depends on z, not on the decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_discriminator_gradient_reaches_the_discriminator_only():
    model = factor_vae()
    model(images()).terms["discriminator"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())


def test_one_backward_gives_each_part_its_own_objective():
    """The summed loss's gradient: D's equals that of its cross-entropy alone; the encoder's that of the VAE part."""
    model = factor_vae(gamma=7.0)
    out = model(images())
    d_params, enc_params = list(model.discriminator.parameters()), list(model.encoder.parameters())
    full = torch.autograd.grad(weighted_loss(out), d_params + enc_params, retain_graph=True)
    d_only = torch.autograd.grad(out.terms["discriminator"], d_params, retain_graph=True)
    vae_part = out.terms["reconstruction"] + out.terms["kl"] + 7.0 * out.terms["tc"]
    enc_only = torch.autograd.grad(vae_part, enc_params)
    for got, want in zip(full, d_only + enc_only):
        torch.testing.assert_close(got, want)


def test_tc_is_the_mean_discriminator_logit():
    """A discriminator with zero weights and final bias c says log D/(1 - D) = c everywhere: TC = c; D(z) = sigmoid(c)
    on both halves, so its cross-entropy is 1/2 [softplus(-c) + softplus(c)] and it is right on the real half only."""
    model = factor_vae()
    with torch.no_grad():
        for p in model.discriminator.parameters():
            p.zero_()
        model.discriminator[-1].bias.fill_(1.7)
    out = model(images(6))
    assert out.terms["tc"].item() == pytest.approx(1.7, abs=1e-6)
    want = 0.5 * (math.log(1 + math.exp(-1.7)) + math.log(1 + math.exp(1.7)))
    assert out.terms["discriminator"].item() == pytest.approx(want, rel=1e-6)
    assert out.stats["discriminator_accuracy"].item() == 0.5


def test_discriminator_cross_entropy_by_hand():
    """Logits 0 and ln 3 give D = 1/2 and 3/4; the permuted 0 and -ln 3 give 1 - D = 1/2 and 3/4:
    -1/2 [mean(log 1/2, log 3/4) + mean(log 1/2, log 3/4)] = -log(3/8) / 2."""
    real = torch.tensor([0.0, math.log(3.0)])
    permuted = torch.tensor([0.0, -math.log(3.0)])
    want = -0.5 * ((math.log(0.5) + math.log(0.75)) / 2 + (math.log(0.5) + math.log(0.75)) / 2)
    assert discriminator_loss(real, permuted).item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(math.log(8 / 3) / 2)
    # a confident, right discriminator costs almost nothing; a confident, wrong one costs its margin
    assert discriminator_loss(torch.tensor([30.0]), torch.tensor([-30.0])).item() == pytest.approx(0.0, abs=1e-12)
    assert discriminator_loss(torch.tensor([-30.0]), torch.tensor([30.0])).item() == pytest.approx(30.0, rel=1e-6)


def test_permute_dims_keeps_every_marginal():
    torch.manual_seed(0)
    z = torch.randn(50, 4)
    shuffled = permute_dims(z)
    assert torch.equal(shuffled.sort(dim=0).values, z.sort(dim=0).values)  # each column: the same values
    assert not torch.equal(shuffled, z)
    # each column has its own permutation: identical columns do not stay identical
    same = permute_dims(torch.arange(50.0)[:, None].repeat(1, 4))  # (50, 4)
    assert not all(torch.equal(same[:, 0], same[:, j]) for j in range(1, 4))


def test_permute_dims_destroys_dependence():
    """Three copies of one variable (correlation 1) come out with correlations near 0: |r| < 0.1 at B = 2000
    (the standard deviation of r under independence is 1/sqrt(B) = 0.022)."""
    torch.manual_seed(0)
    column = torch.randn(2000, 1)
    z = column.repeat(1, 3)  # (B, 3), perfectly dependent
    assert torch.corrcoef(z.T).min().item() == pytest.approx(1.0)
    shuffled = permute_dims(z)
    r = torch.corrcoef(shuffled.T)  # (3, 3)
    off_diagonal = r[~torch.eye(3, dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.1
    assert torch.equal(shuffled.sort(dim=0).values, z.sort(dim=0).values)


@pytest.mark.parametrize("b, first, second", [(4, [0, 1], [2, 3]), (5, [0, 1, 2], [2, 3, 4]), (1, [0], [0])])
def test_halves(b, first, second):
    z = torch.arange(b, dtype=torch.float32)[:, None]  # (B, 1)
    a, c = halves(z)
    assert a.flatten().tolist() == first and c.flatten().tolist() == second


def test_factor_vae_trains_through_the_engine():
    """The shipped tiny config, through the conformance kit's model check (2 engine steps)."""
    testing.check_model(FACTOR_TINY, steps=2)
