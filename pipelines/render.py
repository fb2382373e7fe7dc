"""Image grids of a trained model: reconstructions, prior samples, latent interpolations."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from vaeflow.core.errors import VaeflowError
from vaeflow.core.files import atomic_write
from vaeflow.core.images import check_image_path, save_grid, square_rows  # noqa: F401 (the CLI imports them from here)
from vaeflow.core.interfaces import Model


def samples(model: Model, n: int, seed: int, out: Path, temperature: float = 1.0) -> Path:
    """n prior samples decoded to the likelihood mean, in a square-ish grid."""
    images = model.generate(n, torch.Generator().manual_seed(seed), temperature)  # (n, C, H, W)
    return save_grid(images, out, nrow=square_rows(n))


def interpolations(model: Model, test: torch.Tensor, pairs: int, steps: int, seed: int, out: Path) -> Path:
    """Rows that walk from one test image's posterior mean to another's, decoded; for a model with code grids (a
    VQ-VAE), the interpolation renderer's rows: its code vectors lerped, and the same snapped to the codebook."""
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[: 2 * pairs]
    if len(idx) < 2 * pairs:
        raise VaeflowError(f"--pairs {pairs} needs {2 * pairs} test images, and the test split has {len(test)}: use "
                           f"--pairs {len(test) // 2} or fewer")
    if model.capabilities.discrete:
        from vaeflow.core.interfaces import RenderContext
        from vaeflow.core.registry import get_registry

        cls = get_registry().get("renderer", "interpolation").cls
        options = cls.Options(pairs=pairs, steps=steps, show_inputs=False)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".interpolate-", dir=out.parent) as tmp:
            [grid] = cls(options).render(RenderContext(model=model, images=test, out_dir=Path(tmp), seed=seed))
            if out.suffix.lower() == grid.suffix:
                os.replace(grid, out)
            else:  # a .jpg asked for
                from PIL import Image

                atomic_write(out, lambda dst: Image.open(grid).convert("RGB").save(dst, format="JPEG"))
        return out
    test = test.to(model.device)
    grid = model.interpolate(test[idx[:pairs]], test[idx[pairs:]], steps)  # (pairs, steps, C, H, W)
    return save_grid(grid.flatten(0, 1), out, nrow=steps)


def reconstructions(model: Model, test: torch.Tensor, n: int, out: Path) -> Path:
    """Pairs of rows: n test images above their reconstructions."""
    x = test[:n].to(model.device)  # (n, C, H, W)
    recon = model.reconstruct(x)
    rows = square_rows(n)
    chunks = [torch.cat([a, b]) for a, b in zip(x.split(rows), recon.split(rows))]
    return save_grid(torch.cat(chunks), out, nrow=rows)


def render_all(model, cfg, images: torch.Tensor, out_dir: Path, priors: dict | None = None,
               names: list[str] | None = None) -> list[Path]:
    """Run the configured renderers that apply to this model kind (or only `names`), each into out_dir/NAME/."""
    from vaeflow.core.interfaces import RenderContext
    from vaeflow.core.model import component_options
    from vaeflow.core.registry import get_registry

    registry, kind = get_registry(), model.capabilities.latents
    chosen = [(spec.name, component_options(registry.get("renderer", spec.name).cls, spec))
              for spec in cfg.render.renderers]
    if names:
        for name in names:
            if name not in registry.names("renderer"):
                raise VaeflowError(f"unknown renderer {name!r}; known renderers: {', '.join(registry.names('renderer'))}")
        configured = {name for name, _ in chosen}  # a renderer asked for but not configured runs with its defaults
        chosen += [(name, registry.get("renderer", name).cls.Options()) for name in names if name not in configured]
        chosen = [(name, options) for name, options in chosen if name in names]
    images = images[: cfg.render.max_examples]
    out_dir = Path(out_dir)
    made = [] if out_dir.is_dir() else [q for q in (out_dir, *out_dir.parents) if not q.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    # every renderer writes into a temporary folder beside the output, moved into place once all of them succeeded:
    # a renderer that fails (too few images, a full disk) leaves none of the others' files behind
    staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out_dir))
    try:
        paths: list[Path] = []
        for name, options in chosen:
            cls = registry.get("renderer", name).cls
            if kind not in cls.kinds:
                if names:
                    raise VaeflowError(f"renderer {name!r} renders {' and '.join(cls.kinds)} models, but this is a "
                                       f"{cfg.model.kind} ({kind} latents)")
                continue
            ctx = RenderContext(model=model, images=images, out_dir=staging / name, seed=cfg.render.seed,
                                priors=priors or {})
            try:
                paths += cls(options).render(ctx)
            except VaeflowError as exc:  # say which renderer: the message is the renderer's own
                exc.args = (f"renderer {name!r}: {exc}", *exc.args[1:])
                raise
        for folder in sorted(p.name for p in staging.iterdir()):
            if (out_dir / folder).is_dir():
                shutil.rmtree(out_dir / folder)  # a re-render replaces the renderer's earlier files
            os.replace(staging / folder, out_dir / folder)
        made = []
        return [out_dir / p.relative_to(staging) for p in paths]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in made:  # a failed render removes the folders it made (each empty now), innermost first
            try:
                folder.rmdir()
            except OSError:
                break
