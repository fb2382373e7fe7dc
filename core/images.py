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


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_grid_memory(count: int, shape: tuple[int, ...], option: str) -> None:
    """A VaeflowError, before any work, when a grid of `count` images of `shape` (C, H, W) would not fit in half the
    memory available: the decoded float32 images, the float32 grid and its 8-bit copy."""
    per_image = math.prod(shape) * (4 + 4 + 1)
    available = available_memory()
    if available is None or count * per_image <= available // 2:
        return
    from vaeflow.core.files import human_bytes

    most = max(1, available // 2 // per_image)
    raise VaeflowError(f"{option}: a grid of {count:,} images of {'x'.join(map(str, shape))} needs about "
                       f"{human_bytes(count * per_image)} of memory, and {human_bytes(available)} is available; "
                       f"ask for at most {most:,} images")


def square_rows(n: int) -> int:
    """Images per row of a square-ish grid of n."""
    return max(1, math.ceil(math.sqrt(n)))
