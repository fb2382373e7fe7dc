"""Offline sample-quality scores: FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018).

The features come from `FeatureNet`, a small classifier trained on the dataset itself, so the scores
need no download. They are comparable only between runs scored with the same feature network (same
weights file); they are not comparable with published Inception FIDs. `inception_extractor` gives the
standard InceptionV3 features when torch-fidelity and its weights file are installed.

FID:  https://arxiv.org/abs/1706.08500    KID:  https://arxiv.org/abs/1801.01401
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from vaeflow.core.checkpoint import save_weights, write_text
from vaeflow.core.errors import CheckpointError, DataError, VaeflowError
from vaeflow.core.interfaces import to_unit_float

FEATURES_WEIGHTS = "features.safetensors"
FEATURES_INFO = "features.json"
FORMAT = "vaeflow-features-1"


class FeatureNet(nn.Module):
    """A small conv classifier whose penultimate activations serve as image features."""

    def __init__(self, in_shape: Sequence[int], n_classes: int, feature_dim: int = 128,
                 channels: Sequence[int] = (32, 64)):
        super().__init__()
        c, h, w = (int(s) for s in in_shape)
        self.in_shape, self.n_classes = (c, h, w), int(n_classes)
        self.feature_dim, self.channels = int(feature_dim), tuple(int(k) for k in channels)
        blocks = []
        for k in self.channels:  # conv 3x3 with stride 2 -> ReLU: halves H and W (ceil); 4x cheaper than conv + pool
            blocks += [nn.Conv2d(c, k, 3, stride=2, padding=1), nn.ReLU()]
            c, h, w = k, (h + 1) // 2, (w + 1) // 2
        self.conv = nn.Sequential(*blocks)
        self.penultimate = nn.Linear(c * h * w, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations after the ReLU: (B, C, H, W) in [0, 1] -> (B, feature_dim)."""
        h = self.conv(x).flatten(1)  # (B, K * H' * W')
        return F.relu(self.penultimate(h))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: (B, C, H, W) -> (B, n_classes)."""
        return self.head(self.features(x))


def _check_images(images: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    """Fail with a clear message on images that are not (N, C, H, W) or labels that do not match them."""
    if images.dim() != 4:
        raise DataError(f"{split} images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise DataError(f"{split} labels must be ({len(images)},) to match the images, got {tuple(labels.shape)}")


@torch.no_grad()
def _accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device) -> float:
    """Fraction of images (N, C, H, W) whose arg-max logit is the label (N,)."""
    correct = 0
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size)):
        logits = net(to_unit_float(xb).to(device))  # (B, n_classes)
        correct += int((logits.argmax(1).cpu() == yb).sum())
    return correct / max(1, len(images))


def train_feature_net(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                      test_labels: torch.Tensor, epochs: int = 3, batch_size: int = 256, lr: float = 1e-3,
                      seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                      **net_options) -> tuple[FeatureNet, dict]:
    """Train a FeatureNet with Adam on (N, C, H, W) images (uint8 or float in [0, 1]) and int labels (N,).

    Deterministic for a seed on the CPU; the global torch RNG is left as it was. Returns the net in eval
    mode and {"accuracy": test accuracy, "train_accuracy": accuracy on the last epoch's batches, ...}.
    `net_options` (feature_dim, channels) go to FeatureNet.
    """
    _check_images(train_images, train_labels, "train")
    _check_images(test_images, test_labels, "test")
    train_labels, test_labels = train_labels.long().cpu(), test_labels.long().cpu()
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(train_images.shape[1:], n_classes, **net_options).to(device)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        n = len(train_images)
        from tqdm import tqdm

        bar = tqdm(total=epochs * math.ceil(n / batch_size), unit="step", disable=not progress, desc="features")
        train_acc = 0.0
        for _ in range(epochs):
            net.train()
            correct = 0
            for idx in torch.randperm(n, generator=gen).split(batch_size):
                x = to_unit_float(train_images[idx]).to(device)  # (B, C, H, W)
                y = train_labels[idx].to(device)  # (B,)
                logits = net(x)  # (B, n_classes)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == y).sum())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            train_acc = correct / n
        bar.close()
    net.eval()
    info = {"accuracy": _accuracy(net, test_images, test_labels, 1000, device), "train_accuracy": train_acc,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": len(train_images),
            "n_test": len(test_images), "train_seconds": time.perf_counter() - start}
    return net, info


def save_feature_net(path_dir: str | Path, net: FeatureNet, info: dict | None = None) -> None:
    """Atomically write features.safetensors and features.json (architecture + info) into a folder."""
    path_dir = Path(path_dir)
    arch = {"format": FORMAT, "in_shape": list(net.in_shape), "n_classes": net.n_classes,
            "feature_dim": net.feature_dim, "channels": list(net.channels)}
    meta = {**(info or {}), **arch}
    save_weights(path_dir / FEATURES_WEIGHTS, net, {"vaeflow": json.dumps(arch, sort_keys=True)})
    write_text(path_dir / FEATURES_INFO, json.dumps(meta, indent=2, sort_keys=True))


def load_feature_net(path_dir: str | Path, device: str | torch.device = "cpu") -> tuple[FeatureNet, dict]:
    """Rebuild a saved FeatureNet (in eval mode) and its info; a missing or corrupt file is a CheckpointError."""
    path_dir = Path(path_dir)
    info_path, weights = path_dir / FEATURES_INFO, path_dir / FEATURES_WEIGHTS
    for path in (info_path, weights):
        if not path.is_file():
            raise CheckpointError(f"no {path.name} in {path_dir}; train and save a feature network first "
                                  f"(vaeflow.core.sample_quality.train_feature_net, then save_feature_net)")
    try:
        info = json.loads(info_path.read_text())
        net = FeatureNet(info["in_shape"], info["n_classes"], info["feature_dim"], info["channels"])
    except Exception as exc:
        raise CheckpointError(f"{info_path} is corrupt or not a feature-network description "
                              f"({type(exc).__name__}: {str(exc)[:200]}); save the feature network again") from None
    try:
        state = safetensors.torch.load_file(weights, device="cpu")
        net.load_state_dict(state)
    except Exception as exc:
        raise CheckpointError(f"{weights} is corrupt or does not match {info_path.name} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); save the feature network again") from None
    return net.to(device).eval(), info


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """net.features of images (N, C, H, W), uint8 or float in [0, 1], in eval mode: (N, F) float64."""
    was_training = net.training
    net.eval()
    try:
        device = next(net.parameters()).device
        parts = [net.features(to_unit_float(xb).to(device)).double().cpu() for xb in images.split(batch_size)]
        return torch.cat(parts).numpy()  # (N, F)
    finally:
        net.train(was_training)


def _as_float64(a) -> torch.Tensor:
    """A numpy array or tensor as a float64 CPU tensor."""
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (F, F) through its eigendecomposition, negative eigenvalues clamped."""
    w, v = torch.linalg.eigh((c + c.T) / 2)  # (F,), (F, F)
    return (v * w.clamp(min=0).sqrt()) @ v.T  # (F, F)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance of N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017, eq. 6); means (F,), covariances (F, F).

    d² = ||mu1 - mu2||² + Tr(C1 + C2 - 2 (C1 C2)^{1/2}). C1 C2 is not symmetric, but it has the
    eigenvalues of the symmetric PSD matrix S C2 S with S = C1^{1/2} (AB and BA share eigenvalues), so
    Tr (C1 C2)^{1/2} = sum_i sqrt(lambda_i(S C2 S)). Both eigendecompositions are symmetric (eigh) in
    float64, and eigenvalues that round-off pushes below zero are clamped to 0; this avoids the complex
    parts scipy.linalg.sqrtm can return for near-singular covariances. The result is clamped at 0.
    """
    mu1, mu2, c1, c2 = (_as_float64(a) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"covariances {tuple(c1.shape)}, {tuple(c2.shape)}")
    s1 = _psd_sqrt(c1)  # (F, F)
    m = s1 @ c2 @ s1  # (F, F), symmetric PSD
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_sqrt
    return max(0.0, float(d2))


def _moments(f) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F)."""
    f = _as_float64(f)
    if f.dim() != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got shape {tuple(f.shape)}")
    return f.mean(0), torch.cov(f.T)


def fid_from_features(f1, f2) -> float:
    """FID between two feature sets (N1, F) and (N2, F): the Fréchet distance of Gaussians fit to each."""
    return frechet_distance(*_moments(f1), *_moments(f2))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)^3 between rows of x (M, d) and y (N, d): (M, N)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) with the polynomial kernel between x (M, d) and y (N, d)."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
                 + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1)) - 2 * k_xy.mean())


def kernel_distance(f1, f2, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> dict:
    """KID (Bińkowski et al. 2018): unbiased MMD² between features (N1, F) and (N2, F), mean and std over subsets.

    Each of `subsets` draws takes min(subset_size, N1, N2) rows of each set without replacement; when
    that is all of both sets, every draw gives the same estimate and kid_std is 0.
    """
    x, y = _as_float64(f1), _as_float64(f2)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N1, F) and (N2, F), got {tuple(x.shape)} and {tuple(y.shape)}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    scores = np.array([mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
                       for _ in range(subsets)])
    return {"kid": float(scores.mean()), "kid_std": float(scores.std())}


def quality_scores(net: nn.Module, real_images: torch.Tensor, fake_images: torch.Tensor, batch_size: int = 500,
                   kid_subsets: int = 10, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """FID and KID between real and generated images (N, C, H, W) in the feature space of `net`."""
    if len(real_images) < 2 or len(fake_images) < 2:  # a covariance needs two
        raise DataError(f"FID and KID need at least 2 real (test) and 2 generated images, got {len(real_images)} and "
                        f"{len(fake_images)}: give the test split 2 or more images (e.g. data.dataset.n_test), or "
                        f"set quality.enabled: false")
    f_real = extract_features(net, real_images, batch_size)  # (N1, F)
    f_fake = extract_features(net, fake_images, batch_size)  # (N2, F)
    return {"fid": fid_from_features(f_real, f_fake),
            **kernel_distance(f_real, f_fake, kid_subsets, kid_subset_size, seed)}


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 pool features (2048) behind the FeatureNet interface: `features(x)`."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1], C = 1 or 3 -> (B, 2048); images are quantised to uint8 RGB first."""
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (B, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # (B, 3, H, W)
        return self.extractor(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as features(x)."""
        return self.features(x)


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_extractor(weights_path: str | Path | None = None,
                        device: str | torch.device = "cpu") -> InceptionFeatures:
    """The standard FID InceptionV3 features from torch-fidelity, read offline; else a VaeflowError.

    `weights_path` defaults to torch-fidelity's download cache under torch.hub.get_dir()/checkpoints.
    """
    hint = ("the offline feature network (vaeflow.core.sample_quality.train_feature_net) is the default and needs "
            "neither")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise VaeflowError(f"Inception features need torch-fidelity (`pip install torch-fidelity`) and its weights "
                           f"file {INCEPTION_WEIGHTS}, but torch-fidelity cannot be imported ({exc}); {hint}") from None
    path = Path(weights_path) if weights_path else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        raise VaeflowError(f"Inception features need torch-fidelity's weights file {INCEPTION_WEIGHTS}, not found at "
                           f"{path} (no download is attempted: place the file there or pass weights_path); {hint}")
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    return InceptionFeatures(extractor).to(device).eval()
