"""Encoders, decoders and the assembled model: shapes, generation, interpolation, denoising."""

from __future__ import annotations

import pytest
import torch

from vaeflow.core.config import validate
from vaeflow.core.errors import ConfigError
from vaeflow.core.model import build_model
from vaeflow.plugins.decoders import ConvDecoder, MLPDecoder
from vaeflow.plugins.encoders import ConvEncoder, MLPEncoder


def cfg_for(size: int, channels=(16, 32), kind="vae", likelihood=None, noise=None, pad_to=None):
    raw = {
        "data": {"dataset": {"name": "shapes", "image_size": size, "n_train": 64, "n_test": 16}, "pad_to": pad_to},
        "model": {
            "kind": kind, "latent_dim": 4,
            "encoder": {"name": "conv", "channels": list(channels), "hidden": 32},
            "decoder": {"name": "conv", "channels": list(reversed(channels)), "hidden": 32},
            "likelihood": likelihood or {"name": "bernoulli"}, "noise": noise,
        },
    }
    return validate(raw)


@pytest.mark.parametrize("size, channels", [(28, (8, 16)), (32, (8, 16)), (32, (8, 8, 8)), (64, (4, 4, 4, 4)), (24, (8, 8, 8))])
def test_conv_shapes_for_sizes_the_strides_allow(size, channels):
    model = build_model(cfg_for(size, channels))
    x = torch.rand(3, 1, size, size)
    assert model.encoder(x).shape == (3, 8)  # 2 * latent_dim
    assert model.decode(torch.randn(3, 4)).shape == (3, 1, size, size)


@pytest.mark.parametrize("size, channels, multiple", [(28, (8, 8, 8), 8), (30, (8, 8), 4), (33, (8,), 2)])
def test_conv_rejects_sizes_the_strides_cannot_divide(size, channels, multiple):
    with pytest.raises(ConfigError) as info:
        build_model(cfg_for(size, channels))
    assert f"multiples of {multiple}" in str(info.value)
    assert info.value.problems[0][0] == "model.encoder"


def test_pad_to_makes_28_fit_three_stages():
    model = build_model(cfg_for(28, (8, 8, 8), pad_to=32))
    assert model.decode(torch.randn(2, 4)).shape == (2, 1, 32, 32)


def test_mlp_parameter_count_matches_784_400_20():
    enc = MLPEncoder(MLPEncoder.Options(hidden=[400]), (1, 28, 28), 40)
    dec = MLPDecoder(MLPDecoder.Options(hidden=[400]), 20, (1, 28, 28))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(enc) == 784 * 400 + 400 + 400 * 40 + 40
    assert n(dec) == 20 * 400 + 400 + 400 * 784 + 784


def test_conv_encoder_decoder_are_independent_of_batch():
    torch.manual_seed(0)
    enc = ConvEncoder(ConvEncoder.Options(channels=[4, 8], hidden=16), (3, 16, 16), 6)
    dec = ConvDecoder(ConvDecoder.Options(channels=[8, 4], hidden=16), 3, (3, 16, 16))
    x = torch.rand(5, 3, 16, 16)
    assert torch.allclose(enc(x)[2:3], enc(x[2:3]), atol=1e-6)
    z = torch.randn(5, 3)
    assert torch.allclose(dec(z)[4:], dec(z[4:]), atol=1e-6)


def test_generate_and_interpolate():
    torch.manual_seed(0)
    model = build_model(cfg_for(32)).eval()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = model.generate(6, g()), model.generate(6, g())
    assert a.shape == (6, 1, 32, 32) and torch.equal(a, b)  # seeded, reproducible
    assert a.min() >= 0 and a.max() <= 1  # Bernoulli means
    # generation decodes z ~ N(0, I): the same z by hand gives the same images
    z = torch.randn(6, 4, generator=g())
    assert torch.allclose(a, torch.sigmoid(model.decode(z)))
    x_a, x_b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    path = model.interpolate(x_a, x_b, steps=5)
    assert path.shape == (2, 5, 1, 32, 32)
    assert torch.allclose(path[:, 0], model.reconstruct(x_a), atol=1e-6)
    assert torch.allclose(path[:, -1], model.reconstruct(x_b), atol=1e-6)
    # the midpoint decodes the mean of the two posterior means
    z_mid = 0.5 * (model.posterior(x_a).mode() + model.posterior(x_b).mode())
    assert torch.allclose(path[:, 2], torch.sigmoid(model.decode(z_mid)), atol=1e-5)


def test_autoencoder_has_no_kl_and_dae_corrupts_only_in_training():
    ae = build_model(cfg_for(32, kind="ae", likelihood={"name": "gaussian", "sigma": 0.1}))
    assert ae.encoder.out_features == 4  # a code, not posterior parameters
    x = torch.rand(4, 1, 32, 32)
    out = ae(x)
    assert set(out.terms) == {"reconstruction"} and ae.scheduled is None  # no KL term to weight
    assert torch.allclose(out.terms["reconstruction"], -ae.likelihood.log_prob(x, ae.decode(ae.encoder(x))).mean())

    def nll(model, z):
        return -model.likelihood.log_prob(x, model.decode(z)).mean()

    dae = build_model(cfg_for(32, kind="dae", likelihood={"name": "gaussian"}, noise={"name": "masking", "p": 0.5}))
    dae.train()
    torch.manual_seed(1)
    noisy = dae.posterior(dae.noise(x)).mode()
    torch.manual_seed(1)
    assert torch.allclose(dae(x).terms["reconstruction"], nll(dae, noisy))  # encoder saw the corrupted input
    assert not torch.allclose(nll(dae, noisy), nll(dae, dae.posterior(x).mode()))  # and the corruption mattered
    dae.eval()
    assert torch.allclose(dae(x).terms["reconstruction"], nll(dae, dae.posterior(x).mode()))  # no noise at eval


def test_gaussian_learned_per_pixel_doubles_decoder_channels():
    model = build_model(cfg_for(32, likelihood={"name": "gaussian-learned", "sigma": "per-pixel"}))
    assert model.decode(torch.randn(2, 4)).shape == (2, 2, 32, 32)
    assert model.reconstruct(torch.rand(2, 1, 32, 32)).shape == (2, 1, 32, 32)
