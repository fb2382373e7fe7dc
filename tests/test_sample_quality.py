"""core/sample_quality.py: FID against closed forms and scipy, KID against a hand loop, and the score's ordering
real < reconstructions < noise with a feature network trained on the shapes dataset."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from vaeflow.core.errors import CheckpointError, VaeflowError
from vaeflow.core.sample_quality import (FeatureNet, extract_features, fid_from_features, frechet_distance,
                                 inception_extractor, kernel_distance, load_feature_net, quality_scores,
                                 save_feature_net, train_feature_net)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Train on one CPU thread: on 2 shared cores, 2 threads ran 10-30x slower than 1 while other jobs were busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_of_a_set_to_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))  # (N, F)
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    assert fid_from_features(f, f) <= 1e-6 * np.trace(cov)
    assert frechet_distance(mu, cov, mu, cov) <= 1e-6 * np.trace(cov)


def test_frechet_distance_1d_closed_form():
    m1, s1, m2, s2 = 0.3, 1.7, -1.2, 0.4
    d = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert d == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12)


def test_frechet_distance_commuting_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors: C1 and C2 commute
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_matches_scipy_sqrtm():
    c1, c2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = np.array([0.1, -0.4]), np.array([1.0, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_singular_covariances_is_finite_and_symmetric():
    f = np.random.default_rng(0).normal(size=(10, 32))  # N < F: rank-deficient covariances
    g = np.random.default_rng(1).normal(size=(10, 32)) + 0.5
    d = fid_from_features(f, g)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(fid_from_features(g, f), rel=1e-8)


# ------------------------------------------------------------------------------------ kernel distance
def test_kid_unbiased_estimator_matches_hand_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) + 0.3  # (m, d)
    m, d = 4, 3

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    out = kernel_distance(x, y, subsets=3, subset_size=100)  # capped at 4: every subset is a permutation of all
    assert out["kid"] == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    same = kernel_distance(a, b, subsets=10, subset_size=500)
    shifted = kernel_distance(a, b + 0.5, subsets=10, subset_size=500)
    assert abs(same["kid"]) < 3 * same["kid_std"] + 1e-3
    assert shifted["kid"] > 10 * abs(same["kid"]) and shifted["kid"] > 5 * shifted["kid_std"]


# ------------------------------------------------------------------------------------ feature network
def test_feature_net_shapes():
    net = FeatureNet((3, 28, 20), n_classes=5, feature_dim=16, channels=(4, 8))
    x = torch.rand(7, 3, 28, 20)  # (B, C, H, W)
    assert net.features(x).shape == (7, 16) and (net.features(x) >= 0).all()
    assert net(x).shape == (7, 5)
    f = extract_features(net, (x * 255).to(torch.uint8), batch_size=3)
    assert f.shape == (7, 16) and f.dtype == np.float64


def tiny_data(n=96, seed=0):
    """Two classes of 8x8 images: bright top half or bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    x[y == 0, :, :4] += 0.7
    x[y == 1, :, 4:] += 0.7
    return x, y


def test_train_feature_net_is_deterministic_and_learns():
    x, y = tiny_data()
    kw = dict(epochs=5, batch_size=16, lr=1e-2, seed=3, feature_dim=8, channels=(4,))
    state = torch.get_rng_state()
    net1, info1 = train_feature_net(x, y, x, y, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    net2, _ = train_feature_net(x, y, x, y, **kw)
    for p1, p2 in zip(net1.parameters(), net2.parameters()):
        assert torch.equal(p1, p2)
    assert info1["accuracy"] > 0.9 and info1["epochs"] == 5


def test_save_load_round_trip_and_corrupt_files(tmp_path):
    x, y = tiny_data()
    net, info = train_feature_net((x * 255).to(torch.uint8), y, x, y, epochs=1, batch_size=32,
                                  feature_dim=8, channels=(4, 4))
    save_feature_net(tmp_path, net, info)
    stored = json.loads((tmp_path / "features.json").read_text())
    assert stored["in_shape"] == [1, 8, 8] and stored["channels"] == [4, 4] and stored["accuracy"] == info["accuracy"]
    loaded, loaded_info = load_feature_net(tmp_path)
    assert np.array_equal(extract_features(loaded, x), extract_features(net, x))
    assert loaded_info["feature_dim"] == 8 and not loaded.training

    (tmp_path / "features.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_feature_net(tmp_path)
    save_feature_net(tmp_path, net, info)
    (tmp_path / "features.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_feature_net(tmp_path)
    with pytest.raises(CheckpointError, match="no features.json"):
        load_feature_net(tmp_path / "missing")


def test_inception_extractor_without_torch_fidelity_says_what_is_needed(monkeypatch):
    real_import = builtins.__import__

    def no_fidelity(name, *args, **kwargs):
        if name.startswith("torch_fidelity"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    with pytest.raises(VaeflowError, match="torch-fidelity") as exc:
        inception_extractor()
    assert "weights" in str(exc.value) and "offline feature network" in str(exc.value)


# ------------------------------------------------------------------------------------ ordering on shapes
@pytest.fixture(scope="module")
def shapes_scores(tmp_path_factory):
    """FID and KID of held-out real images, VAE reconstructions and uniform noise against real images."""
    from vaeflow.core.checkpoint import load_model
    from vaeflow.core.config import load_config
    from vaeflow.core.engine import Trainer
    from vaeflow.plugins.datasets import Shapes
    from conftest import TINY

    ds = Shapes(Shapes.Options(image_size=32, n_train=3000, n_test=600))
    test = ds.tensors("test")  # (600, 1, 32, 32)
    net, info = train_feature_net(ds.tensors("train"), ds.labels("train"), test, ds.labels("test"), epochs=4,
                                  batch_size=64, lr=2e-3)
    run = tmp_path_factory.mktemp("vae")
    cfg = load_config(TINY, ["train.epochs=2", "train.progress=false", "data.dataset.n_train=2000"])
    Trainer(cfg, run).fit()
    model, _ = load_model(run)
    real_a, real_b = test[:300], test[300:]
    with torch.no_grad():
        recon = model.reconstruct(real_b)  # (300, 1, 32, 32)
    noise = torch.rand(real_b.shape, generator=torch.Generator().manual_seed(0))  # (300, 1, 32, 32)
    scores = {name: quality_scores(net, real_a, fake)
              for name, fake in {"real": real_b, "recon": recon, "noise": noise}.items()}
    return info, scores


def test_scores_order_real_below_reconstructions_below_noise(shapes_scores):
    info, scores = shapes_scores
    assert info["accuracy"] > 0.3  # 4 shapes, about equally many: chance is 0.25
    for key in ("fid", "kid"):
        assert scores["real"][key] < scores["recon"][key] < scores["noise"][key], (key, scores)
    assert abs(scores["real"]["kid"]) < 0.05 * scores["recon"]["kid"]  # 300 vs 300: every KID subset is the whole set
