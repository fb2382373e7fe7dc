"""Built-in renderers: latent traversals, phase diagrams, interpolations, and code-space edits of VQ models.

Every renderer writes its files atomically under `ctx.out_dir`, picks its test images with a
`torch.Generator` seeded by `ctx.seed`, and decodes in batches of `batch_size`, so its cost grows with
the number of images drawn (plus one encoder pass over at most `max_images` held-out images for the
statistics), not with the dataset.

- `traversal` (continuous): rows are latent dimensions ordered by mean KL (Higgins et al. 2017, beta-VAE,
  fig. 1-7 style), columns sweep one dimension; inactive dimensions ("posterior collapse": mean KL below
  `inactive_kl`; for an AE/DAE the variance of the posterior means below `inactive_variance`) get a red
  frame and are listed in `traversal.json`; one GIF per active dimension.
- `phase` (continuous): a 2-D grid over a pair of dimensions (Kingma & Welling 2014, fig. 4 for J = 2).
- `interpolation` (continuous and discrete): linear paths between test pairs, in latent space or, for a
  VQ model, between quantized code vectors (optionally snapped back onto the codebook).
- `discrete` (discrete): resampling one level of a VQ-VAE-2 with its prior (Razavi et al. 2019, fig. 3-4),
  single-code swaps, and a temperature sweep of prior samples.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
from PIL import Image, ImageDraw
from pydantic import Field, PositiveFloat
from torch import nn
from torchvision.utils import make_grid

from vaeflow.core.bounds import MAX_BATCH, MAX_CODES, MAX_GRID, MAX_IMAGES, MAX_LATENT, MAX_SIDE
from vaeflow.core.checkpoint import atomic_write, write_text
from vaeflow.core.errors import VaeflowError
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, RenderContext, Renderer
from vaeflow.core.codes import sample_codes

PADDING = 2  # pixels between tiles of every grid
RED = (1.0, 0.0, 0.0)  # the frame of an inactive dimension's row
LatentIndex = Annotated[int, Field(le=MAX_LATENT)]  # a latent dimension j
GridIndex = Annotated[int, Field(le=MAX_SIDE)]  # a row or column of a code grid


# --- shared pieces ---------------------------------------------------------------------------
def check_kind(renderer: Renderer, model: nn.Module) -> None:
    """A VaeflowError when the renderer cannot draw this kind of model."""
    kind = model.capabilities.latents
    if kind not in renderer.kinds:
        what = getattr(model, "kind", type(model).__name__)
        raise VaeflowError(f"renderer {renderer.name!r} draws {' / '.join(renderer.kinds)} models, but the model "
                           f"({what}) is {kind}; pick a renderer whose kinds include {kind!r}")


@contextmanager
def eval_mode(module: nn.Module):
    """Eval mode and no gradients inside the block, the previous mode after it."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def pick(n: int, count: int, seed: int, option: str = "") -> torch.Tensor:
    """`count` distinct indices of n, drawn with a generator seeded by `seed`: (count,) int64; `option` names the
    renderer option that asked for them, for the message when n is too few."""
    if count > n:
        asked = f" (its option {option})" if option else ""
        raise VaeflowError(f"it needs {count} held-out images{asked}, but only {n} are given: lower that option in "
                           f"render.renderers, or render with more test images (render.max_examples, and the test "
                           f"split's size, e.g. data.dataset.n_test, cap them)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]


def subset(images: torch.Tensor, max_images: int, seed: int) -> torch.Tensor:
    """At most max_images of images (N, C, H, W), a seeded random subset when there are more."""
    if len(images) <= max_images:
        return images
    return images[pick(len(images), max_images, seed)]


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-free model)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def decode_latents(model: nn.Module, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Likelihood means of latents z (N, J) -> (N, C, H, W) on the CPU, decoded batch_size at a time."""
    device = device_of(model)
    parts = [model.likelihood.mean(model.decode(chunk.to(device))).cpu() for chunk in z.split(batch_size)]
    return torch.cat(parts)  # (N, C, H, W)


@torch.no_grad()
def decode_codes(model: nn.Module, codes: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Likelihood means of code grids {level: (N, h, w)} -> (N, C, H, W) on the CPU, in batches."""
    device, n = device_of(model), len(next(iter(codes.values())))
    parts = [model.likelihood.mean(model.decode_codes({lv: c[i:i + batch_size].to(device) for lv, c in codes.items()}))
             .cpu() for i in range(0, n, batch_size)]
    return torch.cat(parts)  # (N, C, H, W)


@torch.no_grad()
def encode_codes(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Code grids of images (N, C, H, W) -> {level: (N, h, w) int64} on the CPU, in batches."""
    device = device_of(model)
    parts = [model.encode_codes(chunk.to(device)) for chunk in images.split(batch_size)]
    return {level: torch.cat([p[level].cpu() for p in parts]) for level in model.levels}


def grid_image(images: torch.Tensor, nrow: int, row_labels: list[str] | None = None,
               framed_rows: set[int] | frozenset = frozenset(), title: str | None = None) -> Image.Image:
    """Tile images (N, C, H, W) in [0, 1] with torchvision's make_grid, frame some rows red, add labels: RGB."""
    x = images.detach().float().clamp(0, 1).cpu()  # (N, C, H, W)
    grid = make_grid(x, nrow=nrow, padding=PADDING, pad_value=1.0)  # (3, GH, GW), grey images become RGB
    h = x.shape[2] + PADDING  # height of one row of tiles with its top padding
    for row in framed_rows:
        y0, y1 = row * h, row * h + h + PADDING
        for c, value in enumerate(RED):
            band = grid[c, y0:y1]  # (rows of this tile row and both strips, GW)
            band[:PADDING], band[-PADDING:], band[:, :PADDING], band[:, -PADDING:] = value, value, value, value
    pixels = grid.mul(255).add(0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()  # (GH, GW, 3)
    body = Image.fromarray(pixels, "RGB")
    if not row_labels and not title:
        return body
    probe = ImageDraw.Draw(body)
    margin = int(max((probe.textlength(label) for label in row_labels or []), default=0)) + 6 if row_labels else 0
    top = 14 if title else 0
    if title:  # a wide title widens the margin, so the grid always ends at the right edge
        margin = max(margin, int(probe.textlength(title)) + 2 * PADDING - body.width)
    canvas = Image.new("RGB", (body.width + margin, body.height + top), "white")
    canvas.paste(body, (margin, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PADDING, 1), title, fill="black")
    for row, label in enumerate(row_labels or []):
        draw.text((3, top + row * h + PADDING + x.shape[2] // 2 - 5), label, fill="black")
    return canvas


def write_png(image: Image.Image, path: Path) -> Path:
    """Write a PIL image as PNG, atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)


def write_grid(path: Path, images: torch.Tensor, nrow: int, row_labels: list[str] | None = None,
               framed_rows: set[int] | frozenset = frozenset(), title: str | None = None) -> Path:
    """Write images (N, C, H, W) in [0, 1] as one labelled PNG grid, atomically."""
    return write_png(grid_image(images, nrow, row_labels, framed_rows, title), path)


def gif_frames(sweep: torch.Tensor, scale: int) -> list[Image.Image]:
    """Frames of a forward-and-back sweep: sweep (B, S, C, H, W) -> 2S - 2 frames (2 when S = 2).

    Frame t shows the B images of step s_t = 0, 1, ..., S-1, S-2, ..., 1 side by side, enlarged `scale`
    times (nearest neighbour), above a progress bar of height max(2, scale) whose white marker shows s_t, so
    consecutive frames always differ (Pillow would merge identical ones). Size: (B W scale, H scale + bar).
    """
    b, s, c, h, w = sweep.shape
    bar = max(2, scale)
    width = b * w * scale
    marker = max(1, width // s)
    order = list(range(s)) + list(range(s - 2, 0, -1))
    frames = []
    for step in order:
        row = sweep[:, step].clamp(0, 1).permute(1, 2, 0, 3).reshape(c, h, b * w)  # (C, H, B*W)
        row = row.repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (C, H*scale, B*W*scale)
        progress = torch.zeros(c, bar, width)  # (C, bar, B*W*scale)
        x0 = round(step * (width - marker) / (s - 1))
        progress[:, :, x0:x0 + marker] = 1.0
        frame = torch.cat([row, progress], dim=1).mul(255).add(0.5).clamp(0, 255).byte()  # (C, H', W')
        frames.append(Image.fromarray(frame[0].numpy(), "L") if c == 1
                      else Image.fromarray(frame[:3].permute(1, 2, 0).numpy(), "RGB"))
    return frames


def write_gif(path: Path, frames: list[Image.Image], duration_ms: int) -> Path:
    """Write frames as a looping animated GIF, atomically."""
    atomic_write(path, lambda tmp: frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                                                  duration=duration_ms, loop=0))
    return Path(path)


# --- continuous latents: statistics and sweeps -----------------------------------------------
@dataclass
class LatentStats:
    """Posterior statistics of a continuous model over held-out images."""

    means: torch.Tensor  # (N, J) posterior means (modes)
    kl_per_dim: torch.Tensor  # (J,) mean KL(q(z_j|x) || p(z_j)) in nats; zeros for an AE / DAE
    variance: torch.Tensor  # (J,) variance of the posterior means over the images
    variational: bool  # True when the KL per dimension is known (a VAE): KL scores the dimensions; else the variance does

    @property
    def score(self) -> torch.Tensor:
        """What orders and flags the dimensions: mean KL for a VAE, variance of the means otherwise: (J,)."""
        return self.kl_per_dim if self.variational else self.variance


@torch.no_grad()
def latent_stats(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> LatentStats:
    """Posterior means and per-dimension mean KL over images (N, C, H, W), one batched encoder pass."""
    device = device_of(model)
    means, kls = [], []
    bounded = model.capabilities.log_likelihood == "bound"  # KL per dimension scores the units of a VAE
    for chunk in images.split(batch_size):
        q = model.posterior(chunk.to(device))
        means.append(q.mode().float().cpu())  # (b, J)
        kl = model.prior.kl_per_dim(q) if bounded else None  # (b, J), None without a closed form
        kls.append(kl.float().cpu() if kl is not None else torch.zeros_like(means[-1]))
        bounded = bounded and kl is not None
    mu, kl = torch.cat(means), torch.cat(kls)  # (N, J), (N, J)
    return LatentStats(mu, kl.mean(0), mu.var(0, unbiased=False), bounded)


def activity_order(stats: LatentStats) -> torch.Tensor:
    """Dimensions by score, highest first (stable for ties): (J,) int64."""
    return torch.argsort(stats.score, descending=True, stable=True)


def inactive_dims(stats: LatentStats, inactive_kl: float, inactive_variance: float) -> torch.Tensor:
    """Inactive dimensions: mean KL < inactive_kl (VAE) or variance < inactive_variance (AE/DAE): (J,) bool."""
    return stats.score < (inactive_kl if stats.variational else inactive_variance)


def span_values(stats: LatentStats, range_: str, k: float, q: float, steps: int) -> torch.Tensor:
    """The values each dimension sweeps: (J, steps), ascending.

    range_ "prior": -k .. +k prior standard deviations of N(0, 1) (for an AE / DAE, which has no prior: the
    mean of the posterior means +- k of their standard deviation); "quantile": the q .. 1-q quantiles of the
    posterior means of each dimension over the images.
    """
    t = torch.linspace(0.0, 1.0, steps)  # (S,)
    if range_ == "quantile":
        lo = torch.quantile(stats.means, q, dim=0)  # (J,)
        hi = torch.quantile(stats.means, 1.0 - q, dim=0)  # (J,)
    elif stats.variational:
        j = stats.means.shape[1]
        lo, hi = torch.full((j,), -float(k)), torch.full((j,), float(k))  # (J,)
    else:
        centre, spread = stats.means.mean(0), k * stats.variance.sqrt()  # (J,)
        lo, hi = centre - spread, centre + spread
    values = lo[:, None] + (hi - lo)[:, None] * t[None, :]  # (J, S)
    values[:, 0], values[:, -1] = lo, hi  # the ends exactly, not lo + (hi - lo) * 1
    return values


@torch.no_grad()
def traversal_images(model: nn.Module, base: torch.Tensor, values: torch.Tensor,
                     dims: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
    """Decode base points with one dimension replaced by each of its values: (B, D, S, C, H, W).

    base (B, J) latent points; values (J, S) the sweep of every dimension; dims (D,) the dimensions to sweep,
    in row order (default 0..J-1). Entry [b, d, s] decodes base[b] with z[dims[d]] = values[dims[d], s].
    """
    b, j = base.shape
    dims = torch.arange(j) if dims is None else torch.as_tensor(dims, dtype=torch.long)
    d, s = len(dims), values.shape[1]
    z = base.float().cpu()[:, None, None, :].expand(b, d, s, j).clone()  # (B, D, S, J)
    swept = values.float()[dims][None, :, :, None].expand(b, d, s, 1)  # (B, D, S, 1)
    z.scatter_(3, dims.view(1, d, 1, 1).expand(b, d, s, 1), swept)
    images = decode_latents(model, z.view(-1, j), batch_size)  # (B*D*S, C, H, W)
    return images.view(b, d, s, *images.shape[1:])


@torch.no_grad()
def phase_images(model: nn.Module, base: torch.Tensor, dims: tuple[int, int], row_values: torch.Tensor,
                 col_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """A 2-D sweep: base (J,) with z[dims[0]] = row_values[r], z[dims[1]] = col_values[c] -> (R, Cn, C, H, W)."""
    r, c = len(row_values), len(col_values)
    z = base.float().cpu().expand(r, c, base.shape[0]).clone()  # (R, Cn, J)
    z[:, :, dims[0]] = row_values.float()[:, None]
    z[:, :, dims[1]] = col_values.float()[None, :]
    images = decode_latents(model, z.view(r * c, -1), batch_size)  # (R*Cn, C, H, W)
    return images.view(r, c, *images.shape[1:])


@torch.no_grad()
def interpolate_latent(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, steps: int,
                       batch_size: int = 256) -> torch.Tensor:
    """Decode (1-t) z_a + t z_b, t in linspace(0, 1, steps), z the posterior modes of x_a, x_b (B, C, H, W):
    (B, S, C, H, W); t = 0 and t = 1 are exactly the reconstructions of x_a and x_b."""
    device = device_of(model)
    z_a = model.posterior(x_a.to(device)).mode().float().cpu()  # (B, J)
    z_b = model.posterior(x_b.to(device)).mode().float().cpu()  # (B, J)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)  # (1, S, 1)
    z = torch.lerp(z_a.unsqueeze(1), z_b.unsqueeze(1), t)  # (B, S, J)
    images = decode_latents(model, z.flatten(0, 1), batch_size)  # (B*S, C, H, W)
    return images.view(len(x_a), steps, *images.shape[1:])


# --- discrete codes --------------------------------------------------------------------------
@torch.no_grad()
def interpolate_vectors(model: nn.Module, codes_a: dict[str, torch.Tensor], codes_b: dict[str, torch.Tensor],
                        steps: int) -> dict[str, torch.Tensor]:
    """(1-t) e_a + t e_b per level, e the codebook vectors of the codes (B, h, w): {level: (B, S, D, h, w)}.

    torch.lerp gives e_a exactly at t = 0 and e_b exactly at t = 1, so the ends decode to the reconstructions.
    """
    out = {}
    for level in model.levels:
        quantizer = model.quantizers[level]
        device = quantizer.codebook.device
        e_a = quantizer.lookup(codes_a[level].to(device)).float().cpu()  # (B, D, h, w)
        e_b = quantizer.lookup(codes_b[level].to(device)).float().cpu()  # (B, D, h, w)
        t = torch.linspace(0, 1, steps).view(1, steps, 1, 1, 1)  # (1, S, 1, 1, 1)
        out[level] = torch.lerp(e_a.unsqueeze(1), e_b.unsqueeze(1), t)  # (B, S, D, h, w)
    return out


@torch.no_grad()
def snap_to_codes(model: nn.Module, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nearest code of every vector under each level's own quantizer (its distance, eval mode, no updates):
    {level: (..., D, h, w)} -> {level: (..., h, w) int64}."""
    out = {}
    with eval_mode(model):
        for level, v in vectors.items():
            lead, (d, h, w) = v.shape[:-3], v.shape[-3:]
            quantizer = model.quantizers[level]
            indices = quantizer(v.reshape(-1, d, h, w).to(quantizer.codebook.device)).indices  # (N, h, w)
            out[level] = indices.cpu().view(*lead, h, w)
    return out


@torch.no_grad()
def decode_vectors(model: nn.Module, vectors: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Decode quantized-space vectors {level: (N, D, h, w)} with model.decode_quantized -> (N, C, H, W), batched."""
    device, n = device_of(model), len(next(iter(vectors.values())))
    parts = [model.likelihood.mean(model.decode_quantized({lv: v[i:i + batch_size].to(device)
                                                           for lv, v in vectors.items()})).cpu()
             for i in range(0, n, batch_size)]
    return torch.cat(parts)  # (N, C, H, W)


def resample_level(model, priors: dict, codes: dict[str, torch.Tensor], level: str, samples: int,
                   temperature: float = 1.0, top_k: int | None = None,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Keep each image's codes at every other level, draw `samples` grids per image of `level` from its prior,
    conditioned on the kept codes of the level the model names (model.condition_of): codes {level: (B, h, w)} ->
    {level: (B*samples, h, w)}, image-major."""
    kept = {lv: c.cpu().repeat_interleave(samples, 0) for lv, c in codes.items()}  # (B*S, h, w) per level
    given = model.condition_of(level)
    kept[level] = priors[level].sample(len(kept[level]), kept[given] if given else None, temperature, top_k,
                                       generator).cpu()  # (B*S, h, w)
    return kept


def frequent_codes(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """All K codes ordered by how often they occur in codes (N, h, w), most frequent first (stable): (K,)."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size)  # (K,)
    return torch.argsort(counts, descending=True, stable=True)


def replacement_codes(original: torch.Tensor, ranking: torch.Tensor, count: int) -> torch.Tensor:
    """For each original code (B,), the first `count` codes of ranking (K,) that differ from it: (B, count)."""
    count = min(count, len(ranking) - 1)
    return torch.stack([ranking[ranking != code][:count] for code in original.tolist()])  # (B, count)


def swap_codes(codes: dict[str, torch.Tensor], level: str, position: tuple[int, int],
               replacements: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of each image's codes with the code at `position` of `level` set to each replacement:
    codes {level: (B, h, w)}, replacements (B, R) -> {level: (B*R, h, w)}, image-major; nothing else changes."""
    b, r = replacements.shape
    out = {lv: c.cpu().repeat_interleave(r, 0).clone() for lv, c in codes.items()}  # (B*R, h, w)
    out[level][:, position[0], position[1]] = replacements.reshape(b * r).to(out[level].dtype)
    return out


def temperature_codes(model, priors: dict, levels: tuple[str, ...], n: int, temperatures: list[float],
                      top_k: int | None = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n prior samples per temperature, each row from the same seed: [{level: (n, h, w)}] per temperature."""
    used = {level: priors[level] for level in levels}
    return [{lv: c.cpu() for lv, c in sample_codes(model, used, n, t, top_k, seed).items()} for t in temperatures]


def require_priors(priors: dict, needed: dict[str, list[str]]) -> None:
    """A VaeflowError naming each missing level prior and the part that needs it; needed: {part: [levels]}."""
    missing = {part: [lv for lv in levels if lv not in priors] for part, levels in needed.items()}
    missing = {part: levels for part, levels in missing.items() if levels}
    if missing:
        levels = sorted({lv for lvs in missing.values() for lv in lvs})
        parts = "; ".join(f"{part} needs the {' and '.join(lvs)} prior" for part, lvs in missing.items())
        raise VaeflowError(f"the discrete renderer is missing the prior for level(s) {', '.join(levels)} "
                           f"({parts}); ctx.priors holds: {', '.join(sorted(priors)) or 'none'}. Pass the trained "
                           f"priors, or leave those parts out of the renderer's `parts` option")


# --- renderers -------------------------------------------------------------------------------
class SpanOptions(Options):
    """How far a continuous sweep goes."""

    range: Literal["prior", "quantile"] = Field(
        "prior", description="prior: -k .. +k prior standard deviations (AE/DAE: the mean +- k standard deviations "
                             "of the posterior means); quantile: the q .. 1-q quantiles of the posterior means")
    k: float = Field(3.0, gt=0, description="half-width of the prior range, in standard deviations")
    q: float = Field(0.05, gt=0, lt=0.5, description="lower quantile of the quantile range (upper: 1 - q)")
    max_images: int = Field(
        2000, gt=0, le=MAX_IMAGES, description="held-out images encoded for KL, ordering and quantiles "
                                               "(a seeded subset when ctx.images has more)")
    batch_size: int = Field(256, gt=0, le=MAX_BATCH, description="latents per decoder call")


class TraversalRenderer(Renderer):
    """Per-dimension latent traversals: rows are dimensions by mean KL, columns sweep one value.

    Writes traversal.png (n_examples blocks of J rows x steps columns, each row labelled `z<j>` with its KL
    (or variance), inactive rows framed red), traversal_dim<j>.gif for the first max_gifs active dimensions
    (2 * steps - 2 frames, forward and back), and traversal.json {order, kl_per_dim, variance_per_dim,
    inactive, score, values, examples, gifs}.
    """

    name = "traversal"
    kinds = ("continuous",)

    class Options(SpanOptions):
        steps: int = Field(9, ge=2, le=64, description="values per dimension (columns)")
        n_examples: int = Field(
            1, ge=1, le=MAX_GRID, description="test images whose posterior means are the base points, "
                                              "one block of rows each")
        inactive_kl: float = Field(0.01, ge=0, description="a VAE dimension whose mean KL (nats) is below this is "
                                                           "inactive (collapsed to the prior)")
        inactive_variance: float = Field(0.01, ge=0, description="an AE/DAE dimension whose posterior means vary "
                                                                 "less than this over the images is inactive")
        max_gifs: int = Field(
            16, ge=0, le=MAX_LATENT, description="animated GIFs for at most this many active dimensions, "
                                                 "highest KL first; 0 writes none")
        gif_scale: int = Field(4, ge=1, le=64, description="GIF frames enlarge the images this many times")
        gif_duration_ms: int = Field(100, gt=0, le=60_000, description="display time of each GIF frame")

    def render(self, ctx: RenderContext) -> list[Path]:
        """Write traversal.png, traversal_dim<j>.gif per active dimension (max_gifs), traversal.json."""
        check_kind(self, ctx.model)
        o, out = self.options, Path(ctx.out_dir)
        with eval_mode(ctx.model):
            stats = latent_stats(ctx.model, subset(ctx.images, o.max_images, ctx.seed), o.batch_size)
            order = activity_order(stats)  # (J,)
            inactive = inactive_dims(stats, o.inactive_kl, o.inactive_variance)  # (J,)
            values = span_values(stats, o.range, o.k, o.q, o.steps)  # (J, S)
            examples = pick(len(ctx.images), o.n_examples, ctx.seed, "n_examples")  # (B,)
            base = ctx.model.posterior(ctx.images[examples].to(device_of(ctx.model))).mode().float().cpu()  # (B, J)
            grid = traversal_images(ctx.model, base, values, order, o.batch_size)  # (B, J, S, C, H, W)
        j = len(order)
        unit = "KL" if stats.variational else "var"
        labels = [f"z{d} {unit} {float(stats.score[d]):.3g}" for _ in range(o.n_examples) for d in order.tolist()]
        framed = {e * j + row for e in range(o.n_examples) for row, d in enumerate(order.tolist()) if inactive[d]}
        paths = [write_grid(out / "traversal.png", grid.flatten(0, 2), o.steps, labels, framed)]
        active = [d for d in order.tolist() if not inactive[d]][: o.max_gifs]
        for row, d in enumerate(order.tolist()):
            if d in active:
                frames = gif_frames(grid[:, row], o.gif_scale)  # grid[:, row]: (B, S, C, H, W)
                paths.append(write_gif(out / f"traversal_dim{d:02d}.gif", frames, o.gif_duration_ms))
        sidecar = {
            "order": order.tolist(), "kl_per_dim": stats.kl_per_dim.tolist(),
            "variance_per_dim": stats.variance.tolist(),
            "inactive": [d for d in range(j) if inactive[d]],
            "score": "kl" if stats.variational else "variance",
            "threshold": o.inactive_kl if stats.variational else o.inactive_variance,
            "range": o.range, "values": values.tolist(), "examples": examples.tolist(),
            "gifs": [f"traversal_dim{d:02d}.gif" for d in active], "images_used": len(stats.means),
        }
        write_text(out / "traversal.json", json.dumps(sidecar, indent=2))
        return [*paths, out / "traversal.json"]


class PhaseRenderer(Renderer):
    """A phase diagram: a size x size grid over two latent dimensions, the others held at a base point.

    Row r sets z[dims[0]] to its r-th value (ascending, top to bottom), column c sets z[dims[1]] to its c-th
    value (ascending, left to right). With latent_dim = 2 and base "zero" that is the whole latent plane.
    Writes phase.png.
    """

    name = "phase"
    kinds = ("continuous",)

    class Options(SpanOptions):
        dims: Optional[tuple[LatentIndex, LatentIndex]] = Field(
            None, description="the two dimensions (rows, columns); default the two with the highest mean KL")
        size: int = Field(15, ge=2, le=64, description="values per dimension: a size x size grid")
        base: Literal["zero", "example"] = Field(
            "zero", description="the other dimensions: zero (the prior mean) or the posterior mean of one test image")

    def render(self, ctx: RenderContext) -> list[Path]:
        """Write phase.png."""
        check_kind(self, ctx.model)
        o = self.options
        j = ctx.model.latent_dim
        if j < 2:
            raise VaeflowError(f"the phase renderer needs latent_dim >= 2, the model has {j}")
        if o.dims is not None and (o.dims[0] == o.dims[1] or not all(0 <= d < j for d in o.dims)):
            raise VaeflowError(f"phase renderer: dims={list(o.dims)} must be two different dimensions in 0..{j - 1}")
        with eval_mode(ctx.model):
            stats = latent_stats(ctx.model, subset(ctx.images, o.max_images, ctx.seed), o.batch_size)
            dims = tuple(o.dims) if o.dims is not None else tuple(activity_order(stats)[:2].tolist())
            values = span_values(stats, o.range, o.k, o.q, o.size)  # (J, S)
            if o.base == "zero":
                base = torch.zeros(j)  # (J,)
            else:
                x = ctx.images[pick(len(ctx.images), 1, ctx.seed)].to(device_of(ctx.model))  # (1, C, H, W)
                base = ctx.model.posterior(x).mode().float().cpu()[0]  # (J,)
            grid = phase_images(ctx.model, base, dims, values[dims[0]], values[dims[1]], o.batch_size)  # (S, S, ...)
        labels = [f"{v:+.2f}" for v in values[dims[0]].tolist()]
        cols = values[dims[1]]
        title = f"rows z{dims[0]}, cols z{dims[1]} {cols[0]:+.2f}..{cols[-1]:+.2f}"
        return [write_grid(Path(ctx.out_dir) / "phase.png", grid.flatten(0, 1), o.size, labels, title=title)]


class InterpolationRenderer(Renderer):
    """Rows of linear interpolations between pairs of test images.

    Continuous models walk between posterior means in latent space. VQ models walk between the quantized
    code vectors of the two images (codebook lookups, every level with the same t) and decode them with
    model.decode_quantized; vectors between codes are off the codebook, so with `snap` a second row per pair
    replaces each interpolated vector by its nearest code (under the level's own quantizer distance) before
    decoding: what the model can actually produce. Columns: [x_a] t = 0 .. 1 [x_b]. Writes interpolation.png.
    """

    name = "interpolation"
    kinds = ("continuous", "discrete")

    class Options(Options):
        pairs: int = Field(
            4, ge=1, le=MAX_GRID, description="pairs of test images, one row (two for a snapped VQ model) each")
        steps: int = Field(8, ge=2, le=MAX_GRID, description="interpolation points per row, both ends included")
        snap: bool = Field(True, description="VQ models: add a row that snaps each interpolated vector to its "
                                             "nearest code")
        show_inputs: bool = Field(True, description="put the two input images at the ends of each row")
        batch_size: int = Field(256, gt=0, le=MAX_BATCH, description="images per decoder call")

    def render(self, ctx: RenderContext) -> list[Path]:
        """Write interpolation.png."""
        check_kind(self, ctx.model)
        o, model = self.options, ctx.model
        idx = pick(len(ctx.images), 2 * o.pairs, ctx.seed, "pairs, two images each")  # (2P,)
        x_a, x_b = ctx.images[idx[:o.pairs]], ctx.images[idx[o.pairs:]]  # (P, C, H, W) each
        labels: list[str] = []
        with eval_mode(model):
            if not model.capabilities.discrete:
                rows = [interpolate_latent(model, x_a, x_b, o.steps, o.batch_size)]  # [(P, S, C, H, W)]
                labels = ["" for _ in range(o.pairs)]
            else:
                codes_a, codes_b = encode_codes(model, x_a, o.batch_size), encode_codes(model, x_b, o.batch_size)
                vectors = interpolate_vectors(model, codes_a, codes_b, o.steps)  # {level: (P, S, D, h, w)}
                flat = {lv: v.flatten(0, 1) for lv, v in vectors.items()}  # {level: (P*S, D, h, w)}
                rows = [decode_vectors(model, flat, o.batch_size).view(o.pairs, o.steps, *x_a.shape[1:])]
                names = ["lerp"]
                if o.snap:
                    snapped = {lv: c.flatten(0, 1) for lv, c in snap_to_codes(model, vectors).items()}
                    rows.append(decode_codes(model, snapped, o.batch_size).view(o.pairs, o.steps, *x_a.shape[1:]))
                    names.append("snap")
                labels = [name for _ in range(o.pairs) for name in names]
        grid = torch.stack(rows, dim=1).flatten(0, 1)  # (P*R, S, C, H, W), the R variants of a pair together
        if o.show_inputs:
            r = len(rows)
            ends_a = x_a.repeat_interleave(r, 0)[:, None]  # (P*R, 1, C, H, W)
            ends_b = x_b.repeat_interleave(r, 0)[:, None]  # (P*R, 1, C, H, W)
            grid = torch.cat([ends_a, grid, ends_b], dim=1)  # (P*R, S+2, C, H, W)
        row_labels = labels if any(labels) else None
        return [write_grid(Path(ctx.out_dir) / "interpolation.png", grid.flatten(0, 1), grid.shape[1], row_labels)]


class DiscreteRenderer(Renderer):
    """Code-space views of a VQ-VAE / VQ-VAE-2 through its priors (Razavi et al. 2019).

    - resample (two levels only): per test image a row [image, reconstruction, `samples` decodes with the
      top codes redrawn from the top prior and the bottom codes kept, `samples` decodes with the top codes kept
      and the bottom codes redrawn from the bottom prior conditioned on them] -> discrete_resample.png;
    - swaps: per test image and level a row [reconstruction, the code at `positions[level]` (default the grid
      centre) set to each of the `swaps` most frequent other codes of ctx.images] -> discrete_swaps.png;
    - temperature: per temperature a row of n_per_temperature prior samples, every row from the same seed
      -> discrete_temperature.png.
    A one-level VQ-VAE has nothing to keep fixed while resampling, so `resample` is skipped for it.
    Missing priors for a requested part raise a VaeflowError naming the level.
    """

    name = "discrete"
    kinds = ("discrete",)

    class Options(Options):
        parts: list[Literal["resample", "swaps", "temperature"]] = Field(
            ["resample", "swaps", "temperature"], description="which views to write")
        n_images: int = Field(4, ge=1, le=MAX_GRID, description="test images for the resample and swap views")
        samples: int = Field(4, ge=1, le=MAX_GRID, description="prior draws per image and level in the resample view")
        temperature: PositiveFloat = Field(1.0, description="sampling temperature of the resample view")
        top_k: Optional[int] = Field(
            None, gt=0, le=MAX_CODES, description="sample only among the k most likely codes (all: null)")
        temperatures: list[PositiveFloat] = Field([0.5, 0.75, 1.0, 1.25], min_length=1,
                                                  description="one row of the temperature sweep per value")
        n_per_temperature: int = Field(8, ge=1, le=MAX_GRID, description="prior samples per temperature row")
        swaps: int = Field(4, ge=1, le=MAX_GRID, description="replacement codes per swapped position (the most "
                                                             "frequent codes of ctx.images other than the original)")
        positions: Optional[dict[str, tuple[GridIndex, GridIndex]]] = Field(
            None, description="(row, column) of the swapped code per level; default the centre (h // 2, w // 2)")
        max_images: int = Field(2000, gt=0, le=MAX_IMAGES,
                                description="held-out images whose codes rank the swap replacements")
        batch_size: int = Field(256, gt=0, le=MAX_BATCH, description="images per decoder call")

    def render(self, ctx: RenderContext) -> list[Path]:
        """Write discrete_resample.png (two levels), discrete_swaps.png, discrete_temperature.png as requested."""
        check_kind(self, ctx.model)
        o, model, out = self.options, ctx.model, Path(ctx.out_dir)
        levels = tuple(model.levels)
        several = len(levels) > 1  # resampling the only level is just sampling (the temperature sweep)
        needed = {}
        if "resample" in o.parts and several:
            needed["resample"] = list(levels)
        if "temperature" in o.parts:
            needed["temperature"] = list(levels)
        require_priors(ctx.priors, needed)
        positions = {lv: tuple(o.positions[lv]) if o.positions and lv in o.positions
                     else (model.grids[lv][0] // 2, model.grids[lv][1] // 2) for lv in levels}
        for lv, (r, c) in positions.items():
            h, w = model.grids[lv]
            if not (0 <= r < h and 0 <= c < w):
                raise VaeflowError(f"discrete renderer: positions.{lv}={[r, c]} is outside the {h}x{w} {lv} grid")
        unknown = set(o.positions or {}) - set(levels)
        if unknown:
            raise VaeflowError(f"discrete renderer: positions names level(s) {sorted(unknown)}; the model has {levels}")
        paths = []
        with eval_mode(model):
            x = ctx.images[pick(len(ctx.images), o.n_images, ctx.seed, "n_images")]  # (B, C, H, W)
            codes = encode_codes(model, x, o.batch_size)  # {level: (B, h, w)}
            recon = decode_codes(model, codes, o.batch_size)  # (B, C, H, W)
            if "resample" in o.parts and several:
                generator = torch.Generator().manual_seed(ctx.seed)
                shape = (o.n_images, o.samples, *x.shape[1:])
                redrawn = [decode_codes(model, resample_level(model, ctx.priors, codes, lv, o.samples, o.temperature,
                                                              o.top_k, generator), o.batch_size).view(shape)
                           for lv in levels]  # per level: (B, S, C, H, W)
                grid = torch.cat([x[:, None], recon[:, None], *redrawn], dim=1)  # (B, 2+L*S, C, H, W)
                title = ", ".join(["image, recon"] + [f"{o.samples} x new {lv}" for lv in levels]) + f" (T={o.temperature:g})"
                paths.append(write_grid(out / "discrete_resample.png", grid.flatten(0, 1), grid.shape[1],
                                        title=title))
            if "swaps" in o.parts:
                every = encode_codes(model, subset(ctx.images, o.max_images, ctx.seed), o.batch_size)
                rows, labels = [], []
                for lv in levels:
                    ranking = frequent_codes(every[lv], model.quantizers[lv].codebook_size)  # (K,)
                    r, c = positions[lv]
                    new = replacement_codes(codes[lv][:, r, c], ranking, o.swaps)  # (B, R)
                    swapped = decode_codes(model, swap_codes(codes, lv, (r, c), new), o.batch_size)  # (B*R, ...)
                    rows.append(torch.cat([recon[:, None], swapped.view(o.n_images, new.shape[1], *x.shape[1:])], 1))
                    labels.append([f"{lv} ({r},{c})={int(codes[lv][i, r, c])}" for i in range(o.n_images)])
                width = max(row.shape[1] for row in rows)
                rows = [torch.cat([row, torch.ones(row.shape[0], width - row.shape[1], *row.shape[2:])], 1)
                        for row in rows]  # pad a level with fewer codes (K - 1 < swaps) with white
                grid = torch.stack(rows, dim=1).flatten(0, 1)  # (B*L, 1+R, C, H, W), an image's levels together
                row_labels = [labels[li][i] for i in range(o.n_images) for li in range(len(levels))]
                paths.append(write_grid(out / "discrete_swaps.png", grid.flatten(0, 1), width, row_labels,
                                        title="recon | code at (row,col) -> frequent codes"))
            if "temperature" in o.parts:
                sweep = temperature_codes(model, ctx.priors, levels, o.n_per_temperature, o.temperatures, o.top_k, ctx.seed)
                images = torch.cat([decode_codes(model, c, o.batch_size) for c in sweep])  # (T*n, C, H, W)
                paths.append(write_grid(out / "discrete_temperature.png", images, o.n_per_temperature,
                                        [f"T={t:g}" for t in o.temperatures]))
        return paths


@hookimpl
def register_renderers(register):
    """Register the built-in renderers."""
    register(TraversalRenderer)
    register(PhaseRenderer)
    register(InterpolationRenderer)
    register(DiscreteRenderer)
