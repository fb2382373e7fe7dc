"""Image grids on disk: one PNG or JPEG of many images, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import save_image

from vaeflow.core.checkpoint import atomic_write
from vaeflow.core.errors import VaeflowError


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
