"""Image grids of a trained model: reconstructions, prior samples, latent interpolations."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from core.checkpoint import atomic_write
from core.errors import VaeflowError
from core.model import VAE


def check_image_path(out: Path) -> Path:
    """A VaeflowError unless `out` names a .png or .jpg file."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise VaeflowError(f"--out {out}: use a .png or .jpg file name")
    return out


def save_grid(images: torch.Tensor, out: Path, nrow: int) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one PNG/JPEG grid, atomically."""
    out = check_image_path(out)
    fmt = "JPEG" if out.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    atomic_write(out, lambda tmp: save_image(images.clamp(0, 1).cpu(), tmp, nrow=nrow, padding=2, format=fmt))
    return out


def square_rows(n: int) -> int:
    """Images per row of a square-ish grid of n."""
    return max(1, math.ceil(math.sqrt(n)))


def samples(model: VAE, n: int, seed: int, out: Path, temperature: float = 1.0) -> Path:
    """n prior samples decoded to the likelihood mean, in a square-ish grid."""
    images = model.generate(n, torch.Generator().manual_seed(seed), temperature)  # (n, C, H, W)
    return save_grid(images, out, nrow=square_rows(n))


def interpolations(model: VAE, test: torch.Tensor, pairs: int, steps: int, seed: int, out: Path) -> Path:
    """Rows that walk from one test image's posterior mean to another's, decoded."""
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[: 2 * pairs]
    if len(idx) < 2 * pairs:
        raise VaeflowError(f"the test split has {len(test)} images, fewer than 2 x pairs={pairs}")
    test = test.to(model.device)
    grid = model.interpolate(test[idx[:pairs]], test[idx[pairs:]], steps)  # (pairs, steps, C, H, W)
    return save_grid(grid.flatten(0, 1), out, nrow=steps)


def reconstructions(model: VAE, test: torch.Tensor, n: int, out: Path) -> Path:
    """Pairs of rows: n test images above their reconstructions."""
    x = test[:n].to(model.device)  # (n, C, H, W)
    recon = model.reconstruct(x)
    rows = square_rows(n)
    chunks = [torch.cat([a, b]) for a, b in zip(x.split(rows), recon.split(rows))]
    return save_grid(torch.cat(chunks), out, nrow=rows)
