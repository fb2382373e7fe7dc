"""Renderer plugins: every grid is checked against decodes of hand-built latents or codes, not just for existence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaeflow.core.config import load_config
from vaeflow.core.errors import VaeflowError
from vaeflow.core.interfaces import RenderContext
from vaeflow.core.model import build_model
from vaeflow.core.priors import build_prior
from vaeflow.core.registry import get_registry
from vaeflow.plugins.datasets import Shapes
from vaeflow.plugins.renderers import (
    PADDING, DiscreteRenderer, InterpolationRenderer, PhaseRenderer, TraversalRenderer, frequent_codes,
    interpolate_latent, interpolate_vectors, latent_stats, phase_images, pick, replacement_codes, resample_level,
    snap_to_codes, span_values, swap_codes, temperature_codes, traversal_images,
)

VAE_CFG, VQ_CFG = "configs/vae-shapes-tiny.yaml", "configs/vqvae2-shapes-tiny.yaml"
SCALES = [5.0, 1.0, 20.0, 3.0, 10.0, 0.0, 8.0, 2.0]  # per-dimension gain of the encoder's mean rows
INACTIVE = 5  # mean and logvar rows zeroed: q(z_5|x) = N(0, 1) exactly, KL = 0
TILE = 32 + PADDING  # a 32x32 image and its padding in every grid
PRIOR = {"name": "gated-pixelcnn", "channels": 8, "layers": 2, "kernel_size": 3}
LEVELS = {"top": {"grid": [4, 4], "codebook_size": 16}, "bottom": {"grid": [8, 8], "codebook_size": 16}}


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    """What a PNG stores: (..., H, W) in [0, 1] -> uint8, rounded."""
    return images.clamp(0, 1).mul(255).add(0.5).clamp(0, 255).byte()


def pixels(path) -> torch.Tensor:
    """An image file as (H, W, 3) uint8."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


def hand_kl(model, images: torch.Tensor) -> torch.Tensor:
    """Mean KL per dimension from the raw encoder output, 1/2 (mu^2 + sigma^2 - 1 - log sigma^2): (J,)."""
    with torch.no_grad():
        mu, logvar = model.encoder(images).chunk(2, dim=1)  # (N, J) each
    return (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).mean(0)


def decode_one(model, z: torch.Tensor) -> torch.Tensor:
    """Likelihood mean of a single latent (J,) -> (C, H, W)."""
    with torch.no_grad():
        return model.likelihood.mean(model.decode(z[None]))[0]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions gain nothing from more threads; one keeps the shared CPUs free."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return Shapes(Shapes.Options(n_train=10, n_test=64)).tensors("test")  # (64, 1, 32, 32)


@pytest.fixture(scope="module")
def vae():
    """The tiny conv VAE with its encoder's mean rows rescaled (distinct KLs) and one dimension switched off."""
    torch.manual_seed(0)
    model = build_model(load_config(VAE_CFG)).eval()
    head, j = model.encoder.head[-1], model.latent_dim
    with torch.no_grad():
        for d, gain in enumerate(SCALES):
            head.weight[d] *= gain
            head.bias[d] *= gain
        head.weight[j + INACTIVE].zero_()
        head.bias[j + INACTIVE].zero_()
    return model


@pytest.fixture(scope="module")
def vq(images):
    """The tiny VQ-VAE-2; one training-mode forward runs its k-means codebook initialisation, so codes vary."""
    torch.manual_seed(0)
    model = build_model(load_config(VQ_CFG))
    with torch.no_grad():
        model.train()(images)
    return model.eval()


@pytest.fixture(scope="module")
def priors():
    torch.manual_seed(1)
    return {level: build_prior(PRIOR, level, LEVELS).eval() for level in LEVELS}


def test_registry_lists_the_four_renderers_with_kinds():
    registry = get_registry()
    assert {"traversal", "phase", "interpolation", "discrete"} <= set(registry.names("renderer"))
    kinds = {name: registry.get("renderer", name).cls.kinds for name in ("traversal", "phase", "interpolation",
                                                                          "discrete")}
    assert kinds == {"traversal": ("continuous",), "phase": ("continuous",),
                     "interpolation": ("continuous", "discrete"), "discrete": ("discrete",)}


# --- traversal -------------------------------------------------------------------------------
def test_traversal_images_decode_the_hand_built_latents(vae, images):
    x = images[:2]
    base = vae.posterior(x).mode().detach()  # (2, J)
    stats = latent_stats(vae, images)
    values = span_values(stats, "prior", 2.0, 0.05, 5)  # (J, 5)
    dims = torch.tensor([2, 0, 7])
    grid = traversal_images(vae, base, values, dims)  # (2, 3, 5, 1, 32, 32)
    assert grid.shape == (2, 3, 5, 1, 32, 32)
    for b in range(2):
        for row, d in enumerate(dims.tolist()):
            for s in range(5):
                z = base[b].clone()
                z[d] = values[d, s]
                torch.testing.assert_close(grid[b, row, s], decode_one(vae, z), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grid[0, 0, 0], grid[0, 0, -1])  # the sweep of z_2 moves the image


def test_traversal_render_orders_by_kl_marks_inactive_and_writes_gifs(vae, images, tmp_path):
    options = TraversalRenderer.Options(steps=5, k=2.5, max_gifs=2, n_examples=2, gif_scale=3)
    paths = TraversalRenderer(options).render(RenderContext(vae, images, tmp_path, seed=3))
    info = json.loads((tmp_path / "traversal.json").read_text())

    kl = hand_kl(vae, images)  # (J,)
    assert info["order"] == torch.argsort(kl, descending=True).tolist()
    torch.testing.assert_close(torch.tensor(info["kl_per_dim"]), kl, atol=1e-6, rtol=1e-4)
    assert kl[INACTIVE] == 0 and INACTIVE in info["inactive"]
    assert info["inactive"] == [d for d in range(8) if kl[d] < 0.01]
    active = [d for d in info["order"] if d not in info["inactive"]]
    assert len(active) >= 2

    values = torch.tensor(info["values"])  # (J, 5)
    assert (values[:, 0] == -2.5).all() and (values[:, -1] == 2.5).all()
    torch.testing.assert_close(values, torch.linspace(-2.5, 2.5, 5).expand(8, 5))

    gifs = sorted(p.name for p in paths if p.suffix == ".gif")
    assert gifs == sorted(f"traversal_dim{d:02d}.gif" for d in active[:2]) == sorted(info["gifs"])
    for name in gifs:
        gif = Image.open(tmp_path / name)
        assert gif.n_frames == 2 * 5 - 2
        assert gif.size == (2 * 32 * 3, 32 * 3 + 3)  # 2 examples side by side, x3, above a 3-pixel progress bar

    png = pixels(tmp_path / "traversal.png")  # 2 blocks of 8 rows, 5 columns, labels on the left
    assert png.shape[0] == 2 * 8 * TILE + PADDING
    left = png.shape[1] - (5 * TILE + PADDING)  # x of the grid's left edge, after the label margin
    for block in range(2):
        for row, d in enumerate(info["order"]):
            y = (block * 8 + row) * TILE + TILE // 2
            want = [255, 0, 0] if d in info["inactive"] else [255, 255, 255]  # red frame vs white padding
            assert png[y, left].tolist() == want

    # the tiles are the decodes of the base with one dimension swept (first example, top row, both ends)
    example = pick(len(images), 2, 3)[0]
    base = vae.posterior(images[example:example + 1]).mode().detach()[0]
    top = info["order"][0]
    for s, col in ((0, 0), (4, 4)):
        z = base.clone()
        z[top] = values[top, s]
        tile = png[PADDING:PADDING + 32, left + col * TILE + PADDING:left + col * TILE + PADDING + 32, 0]
        assert (tile.int() - as_bytes(decode_one(vae, z))[0].int()).abs().max() <= 1


def test_traversal_quantile_range_uses_the_aggregate_posterior(vae, images, tmp_path):
    options = TraversalRenderer.Options(steps=4, range="quantile", q=0.1, max_gifs=0)
    paths = TraversalRenderer(options).render(RenderContext(vae, images, tmp_path))
    values = torch.tensor(json.loads((tmp_path / "traversal.json").read_text())["values"])  # (J, 4)
    means = vae.posterior(images).mode().detach()  # (N, J)
    torch.testing.assert_close(values[:, 0], torch.quantile(means, 0.1, dim=0))
    torch.testing.assert_close(values[:, -1], torch.quantile(means, 0.9, dim=0))
    assert not any(p.suffix == ".gif" for p in paths)


def test_traversal_of_an_autoencoder_uses_the_variance_of_the_means(images, tmp_path):
    torch.manual_seed(0)
    ae = build_model(load_config(VAE_CFG, ["model.kind=ae"])).eval()
    with torch.no_grad():
        ae.encoder.head[-1].weight[3].zero_()
        ae.encoder.head[-1].bias[3].zero_()
        variance = ae.encoder(images).var(0, unbiased=False)  # (J,)
    TraversalRenderer(TraversalRenderer.Options(steps=3, max_gifs=0)).render(RenderContext(ae, images, tmp_path))
    info = json.loads((tmp_path / "traversal.json").read_text())
    assert info["score"] == "variance" and info["kl_per_dim"] == [0.0] * 8
    assert info["order"] == torch.argsort(variance, descending=True).tolist()
    assert info["inactive"] == [d for d in range(8) if variance[d] < 0.01] and 3 in info["inactive"]


def test_continuous_renderers_refuse_a_vq_model(vq, images, tmp_path):
    with pytest.raises(VaeflowError, match="continuous"):
        TraversalRenderer(TraversalRenderer.Options()).render(RenderContext(vq, images, tmp_path))


# --- phase -----------------------------------------------------------------------------------
def test_phase_corners_of_a_2d_latent_plane(images, tmp_path):
    torch.manual_seed(0)
    vae2 = build_model(load_config(VAE_CFG, ["model.latent_dim=2"])).eval()
    options = PhaseRenderer.Options(dims=(0, 1), size=5, k=2.0, base="zero")  # rows z_0, columns z_1
    [path] = PhaseRenderer(options).render(RenderContext(vae2, images, tmp_path))
    assert path == tmp_path / "phase.png"

    axis = torch.linspace(-2, 2, 5)
    grid = phase_images(vae2, torch.zeros(2), (0, 1), axis, axis)  # (5, 5, 1, 32, 32)
    png = pixels(path)
    left, top = png.shape[1] - (5 * TILE + PADDING), png.shape[0] - (5 * TILE + PADDING)
    for r, c in ((0, 0), (0, 4), (4, 0), (4, 4)):
        corner = decode_one(vae2, torch.tensor([axis[r], axis[c]]))
        assert abs(axis[r]) == 2 and abs(axis[c]) == 2
        torch.testing.assert_close(grid[r, c], corner, atol=1e-5, rtol=1e-5)
        y, x = top + r * TILE + PADDING, left + c * TILE + PADDING
        assert (png[y:y + 32, x:x + 32, 0].int() - as_bytes(corner)[0].int()).abs().max() <= 1


def test_phase_rejects_bad_dims(vae, images, tmp_path):
    for dims in ((1, 1), (0, 8)):
        with pytest.raises(VaeflowError, match="dims"):
            PhaseRenderer(PhaseRenderer.Options(dims=dims, size=2)).render(RenderContext(vae, images, tmp_path))


# --- interpolation ---------------------------------------------------------------------------
def test_continuous_interpolation_ends_are_reconstructions(vae, images, tmp_path):
    x_a, x_b = images[:3], images[3:6]
    rows = interpolate_latent(vae, x_a, x_b, steps=5)  # (3, 5, 1, 32, 32)
    torch.testing.assert_close(rows[:, 0], vae.reconstruct(x_a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows[:, -1], vae.reconstruct(x_b), atol=1e-5, rtol=1e-5)
    mid = 0.5 * (vae.posterior(x_a[:1]).mode() + vae.posterior(x_b[:1]).mode())[0].detach()
    torch.testing.assert_close(rows[0, 2], decode_one(vae, mid), atol=1e-5, rtol=1e-5)

    [path] = InterpolationRenderer(InterpolationRenderer.Options(pairs=2, steps=4)).render(
        RenderContext(vae, images, tmp_path, seed=7))
    png = pixels(path)
    assert png.shape[:2] == (2 * TILE + PADDING, 6 * TILE + PADDING)  # inputs at both ends, no labels
    first = images[pick(len(images), 4, 7)[0]]
    assert (png[PADDING:PADDING + 32, PADDING:PADDING + 32, 0].int() - as_bytes(first)[0].int()).abs().max() <= 1


def test_vq_interpolation_ends_decode_the_codes_and_snap_back_onto_them(vq, images, tmp_path):
    codes_a, codes_b = vq.encode_codes(images[:3]), vq.encode_codes(images[3:6])
    vectors = interpolate_vectors(vq, codes_a, codes_b, steps=5)  # {level: (3, 5, D, h, w)}
    with torch.no_grad():
        ends = [vq.likelihood.mean(vq.decode_quantized({lv: v[:, s] for lv, v in vectors.items()})) for s in (0, 4)]
        for end, codes in zip(ends, (codes_a, codes_b)):
            torch.testing.assert_close(end, vq.likelihood.mean(vq.decode_codes(codes)), atol=1e-5, rtol=1e-5)
    snapped = snap_to_codes(vq, vectors)  # {level: (3, 5, h, w)}
    for lv in vq.levels:
        assert torch.equal(snapped[lv][:, 0], codes_a[lv]) and torch.equal(snapped[lv][:, -1], codes_b[lv])
        book = vq.quantizers[lv].codebook  # (K, D)
        mid = vectors[lv][0, 2].permute(1, 2, 0).reshape(-1, book.shape[1])  # (h*w, D)
        assert torch.equal(snapped[lv][0, 2].flatten(), torch.cdist(mid, book).argmin(1))

    [path] = InterpolationRenderer(InterpolationRenderer.Options(pairs=2, steps=4)).render(
        RenderContext(vq, images, tmp_path))
    assert pixels(path).shape[0] == 2 * 2 * TILE + PADDING  # a lerp and a snap row per pair


def test_vaeflow_interpolate_on_a_vq_model_draws_lerped_and_snapped_rows(vq, images, tmp_path):
    """`vaeflow interpolate` on a VQ-VAE-2 (it has no latent vector to walk) draws the interpolation renderer's rows
    without the input columns: a lerp and a snap row per pair, the last column the second image's reconstruction."""
    from vaeflow.pipelines.render import interpolations

    pairs, steps, seed = 2, 4, 7
    path = interpolations(vq, images, pairs, steps, seed, tmp_path / "sub" / "vi.png")
    png = pixels(path)
    assert png.shape[0] == 2 * pairs * TILE + PADDING and png.shape[1] >= steps * TILE + PADDING
    x_b = images[pick(len(images), 2 * pairs, seed)[pairs]][None]  # (1, 1, 32, 32): the first pair's second image
    with torch.no_grad():
        recon_b = vq.likelihood.mean(vq.decode_codes(vq.encode_codes(x_b)))[0]  # (1, 32, 32)
    last = png[PADDING:PADDING + 32, -TILE:-PADDING, 0]  # the lerp row's t = 1 tile
    assert (last.int() - as_bytes(recon_b)[0].int()).abs().max() <= 1
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["vi.png"]  # no staging folder left


# --- discrete --------------------------------------------------------------------------------
def test_resampling_one_level_keeps_the_other_codes(vq, priors, images):
    codes = vq.encode_codes(images[:2])
    tops = resample_level(vq, priors, codes, "top", 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tops["bottom"], codes["bottom"].repeat_interleave(3, 0))
    assert tops["top"].shape == (6, 4, 4) and not torch.equal(tops["top"], codes["top"].repeat_interleave(3, 0))
    bottoms = resample_level(vq, priors, codes, "bottom", 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bottoms["top"], codes["top"].repeat_interleave(3, 0))
    assert bottoms["bottom"].shape == (6, 8, 8)
    again = resample_level(vq, priors, codes, "bottom", 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["bottom"], bottoms["bottom"])
    # the bottom prior is conditioned on the kept top codes: other top codes give other bottom draws
    other = {**codes, "top": torch.roll(codes["top"], 1, dims=-1)}
    moved = resample_level(vq, priors, other, "bottom", 3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(moved["bottom"], bottoms["bottom"])


def test_discrete_resample_is_reproducible_per_seed(vq, priors, images, tmp_path):
    options = DiscreteRenderer.Options(parts=["resample"], n_images=2, samples=2)
    render = [DiscreteRenderer(options).render(RenderContext(vq, images, tmp_path / name, seed, priors))
              for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert [[p.name for p in paths] for paths in render] == [["discrete_resample.png"]] * 3
    a, b, c = (pixels(paths[0]) for paths in render)
    assert a.shape[1] >= (2 + 2 * 2) * TILE + PADDING
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_code_swaps_change_exactly_one_code_per_level(vq, images, tmp_path):
    codes = vq.encode_codes(images[:3])
    every = vq.encode_codes(images)
    for lv in vq.levels:
        h, w = vq.grids[lv]
        position = (h // 2, w // 2)
        counts = torch.bincount(every[lv].flatten(), minlength=16)
        ranking = frequent_codes(every[lv], 16)
        assert (counts[ranking][:-1] >= counts[ranking][1:]).all()
        new = replacement_codes(codes[lv][:, position[0], position[1]], ranking, 4)  # (3, 4)
        swapped = swap_codes(codes, lv, position, new)
        for other in vq.levels:
            changed = swapped[other] != codes[other].repeat_interleave(4, 0)  # (12, h, w)
            if other != lv:
                assert not changed.any()
            else:
                assert (changed.flatten(1).sum(1) == 1).all() and changed[:, position[0], position[1]].all()
                assert torch.equal(swapped[lv][:, position[0], position[1]], new.flatten())

    options = DiscreteRenderer.Options(parts=["swaps"], n_images=3, swaps=4)
    [path] = DiscreteRenderer(options).render(RenderContext(vq, images, tmp_path))  # swaps need no prior
    assert path.name == "discrete_swaps.png" and pixels(path).shape[0] == 14 + 3 * 2 * TILE + PADDING


def test_discrete_missing_prior_names_the_level(vq, priors, images, tmp_path):
    with pytest.raises(VaeflowError, match="bottom") as err:
        DiscreteRenderer(DiscreteRenderer.Options()).render(
            RenderContext(vq, images, tmp_path, priors={"top": priors["top"]}))
    assert "resample" in str(err.value) and "temperature" in str(err.value)
    assert not list(tmp_path.iterdir())  # checked before anything is written


def test_temperature_sweep_rows_differ_by_temperature_and_repeat(vq, priors, images, tmp_path):
    rows = temperature_codes(vq, priors, vq.levels, 3, [0.5, 2.0], seed=4)  # [{level: (3, h, w)}] per T
    assert any(not torch.equal(rows[0][lv], rows[1][lv]) for lv in vq.levels)

    # the renderer draws the same codes again from the same seed: each row decodes temperature_codes' draw
    options = DiscreteRenderer.Options(parts=["temperature"], temperatures=[0.5, 2.0], n_per_temperature=3)
    [path] = DiscreteRenderer(options).render(RenderContext(vq, images, tmp_path, 4, priors))
    png = pixels(path)
    left = png.shape[1] - (3 * TILE + PADDING)
    assert png.shape[0] == 2 * TILE + PADDING
    with torch.no_grad():
        decoded = [vq.likelihood.mean(vq.decode_codes(codes)) for codes in rows]  # [(3, 1, 32, 32)] per T
    assert not torch.allclose(decoded[0], decoded[1])
    for r in range(2):
        for c in range(3):
            y, x = r * TILE + PADDING, left + c * TILE + PADDING
            assert (png[y:y + 32, x:x + 32, 0].int() - as_bytes(decoded[r][c])[0].int()).abs().max() <= 1


def test_one_level_vqvae_renders_only_the_parts_that_apply(images, tmp_path):
    torch.manual_seed(0)
    vqvae = build_model(load_config(VQ_CFG, ["model.kind=vqvae", "model.vq.strides=[4]"]))
    with torch.no_grad():
        vqvae.train()(images)
    vqvae.eval()
    top = build_prior(PRIOR, "top", {"top": {"grid": [8, 8], "codebook_size": 16}}).eval()
    options = DiscreteRenderer.Options(n_images=2, swaps=2, temperatures=[1.0], n_per_temperature=2)
    with pytest.raises(VaeflowError, match="top"):
        DiscreteRenderer(options).render(RenderContext(vqvae, images, tmp_path))
    paths = DiscreteRenderer(options).render(RenderContext(vqvae, images, tmp_path, priors={"top": top}))
    assert [p.name for p in paths] == ["discrete_swaps.png", "discrete_temperature.png"]
