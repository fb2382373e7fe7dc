"""The `fsq` quantizer: finite scalar quantization, a fixed grid of codes in place of a learned codebook.

Mentzer, Minnen, Agustsson & Tschannen 2023, "Finite Scalar Quantization: VQ-VAE Made Simple" (arXiv:2309.15505):
section 3 (project z_e to d = len(levels) channels, bound channel i to L_i values with f(z) = floor(L/2) tanh(z),
round with a straight-through gradient; the implied codebook is the product grid of K = prod(L_i) codes, with no
codebook or commitment loss), table 1 (the recommended levels: [8, 6, 5] for K = 240 ~ 2^8,
[8, 5, 5, 5] for K = 1000 ~ 2^10, [7, 5, 5, 5, 5] for K = 4375 ~ 2^12, [8, 8, 8, 6, 5] for K = 15360 ~ 2^14,
[8, 8, 8, 5, 5, 5] for K = 64000 ~ 2^16) and appendix A.1 (the reference code: the bound with a half-step offset
for even L, renormalisation to [-1, 1], and the mixed-radix index sum_i digit_i * prod_{j<i} L_j).

Per channel with L levels, half_l = (L - 1)(1 - eps) / 2 and offset = 1/2 for even L (0 for odd L):

    f(z) = tanh(z + shift) * half_l - offset,  shift = atanh(offset / half_l)   (appendix A.1)
    z_hat = round_ste(f(z)) / floor(L / 2)                                     in [-1, 1]

so odd L gives the symmetric grid {-1, ..., 1} and even L the grid {-1, ..., 1 - 2/L} (L = 4: -1, -1/2, 0, 1/2).
Appendix A.1 writes `tan` for the shift, a slip for its inverse: atanh makes f(0) = 0 exactly (z = 0 sits at the
centre of the code 0), and the two agree to first order. It also makes L = 2 undefined (offset / half_l > 1), so
every L must be at least 3, as in all of the paper's recommended sets.

Plugged into a VQ model, z_e (B, D, h, w) is projected to d channels and the rounded codes back to D (1x1, a
linear map per position, skipped when D == d), so the decoder and the code priors see what they see with `vq`.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, field_validator
from torch import nn

from vaeflow.core.bounds import MAX_CODES
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Quantizer, QuantizerOutput
from vaeflow.plugins.quantizers import StraightThrough, code_counts, perplexity

EPS = 1e-3  # appendix A.1: keeps the bound strictly inside its outer codes


class FSQOptions(Options):
    """Options of the finite scalar quantizer; K = codebook_size = prod(levels) follows from the levels."""

    levels: list[Annotated[int, Field(ge=3, le=MAX_CODES)]] = Field(
        [8, 5, 5, 5], min_length=1,
        description="L_i, the number of values of each of the d = len(levels) channels, each >= 3 (L = 2 "
                    "leaves the even-L offset outside the bound); "
                    "K = prod(levels). The paper's sets (table 1): [8, 6, 5] (K = 240), [8, 5, 5, 5] (K = 1000), "
                    "[7, 5, 5, 5, 5] (4375), [8, 8, 8, 6, 5] (15360), [8, 8, 8, 5, 5, 5] (64000)")

    @field_validator("levels")
    @classmethod
    def _codebook_fits(cls, levels: list[int]) -> list[int]:
        """K = prod(levels) is bounded like any codebook: the code counts hold K entries."""
        if math.prod(levels) > MAX_CODES:
            raise ValueError(f"the levels {levels} make a codebook of {math.prod(levels):,} codes, above the upper "
                             f"bound {MAX_CODES:,}; use fewer or smaller levels")
        return levels

    @property
    def codebook_size(self) -> int:
        """K = prod(levels): the size of the implied codebook, read by Quantizer.__init__ (not a config key)."""
        return math.prod(self.levels)


# --- the grid ----------------------------------------------------------------------------------
def bound(z: torch.Tensor, levels: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """f(z) = tanh(z + shift) * half_l - offset (appendix A.1): z (..., d), levels (d,) -> (..., d) in (-L/2, L/2)."""
    half_l = (levels - 1) * (1 - eps) / 2  # (d,)
    offset = (1 - levels % 2) * 0.5  # (d,) 1/2 for even L
    shift = torch.atanh(offset / half_l)  # (d,)
    return torch.tanh(z + shift) * half_l - offset


def round_ste(bounded: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity gradient backward (section 3): (..., d) -> (..., d) integers, exactly."""
    return StraightThrough.apply(bounded, bounded.detach().round())


def radix_basis(levels: torch.Tensor) -> torch.Tensor:
    """The mixed-radix place values prod_{j<i} L_j (appendix A.1): levels (d,) int64 -> (d,) int64."""
    return torch.cumprod(levels, 0) // levels


def codes_to_indices(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Grid codes in [-1, 1] -> their index sum_i digit_i * basis_i: (..., d) -> (...) int64."""
    half_width = levels // 2  # (d,)
    digits = (codes * half_width).round().long() + half_width  # (..., d) in [0, L_i)
    return (digits * radix_basis(levels)).sum(-1)


def indices_to_codes(indices: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Inverse of codes_to_indices: (...) int64 -> (..., d) float32 grid codes in [-1, 1]."""
    half_width = levels // 2  # (d,)
    digits = indices.long()[..., None] // radix_basis(levels) % levels  # (..., d) in [0, L_i)
    return (digits - half_width).float() / half_width


# --- the quantizer -----------------------------------------------------------------------------
class FSQ(Quantizer):
    """Finite scalar quantization: project to d channels, bound, round (straight-through), project back.

    The codebook is implied: every grid point projected back to D, so it moves with the projection's weights;
    nothing is learned per code, so no code can die and there is no codebook or commitment loss (`losses` = {}).
    `stats` are the batch's perplexity and usage, as for `vq`.
    """

    name = "fsq"
    Options = FSQOptions

    def __init__(self, options: FSQOptions, embedding_dim: int):
        super().__init__(options, embedding_dim)
        d = len(options.levels)
        self.register_buffer("levels", torch.tensor(options.levels, dtype=torch.long), persistent=False)  # (d,)
        project = embedding_dim != d
        self.project_in = nn.Linear(embedding_dim, d) if project else nn.Identity()  # D -> d
        self.project_out = nn.Linear(d, embedding_dim) if project else nn.Identity()  # d -> D

    def grid(self) -> torch.Tensor:
        """Every code of the grid in index order: (K, d) in [-1, 1]."""
        return indices_to_codes(torch.arange(self.codebook_size, device=self.levels.device), self.levels)

    @property
    def codebook(self) -> torch.Tensor:
        """The implied codebook: every grid code projected back to D, (K, D)."""
        return self.project_out(self.grid())

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantize z_e (B, D, h, w) to grid codes: quantized (B, D, h, w), indices (B, h, w), no losses."""
        if z_e.dim() != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"{self.name} quantizer expects z_e of shape (B, {self.embedding_dim}, h, w), "
                             f"got {tuple(z_e.shape)}")
        b, d, h, w = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):  # rounding needs float32 resolution
            flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D)
            rounded = round_ste(bound(self.project_in(flat), self.levels))  # (N, d) integers
            codes = rounded / (self.levels // 2)  # (N, d) in [-1, 1]
            indices = codes_to_indices(codes.detach(), self.levels)  # (N,)
            quantized = self.project_out(codes)  # (N, D)
            counts = code_counts(indices, self.codebook_size)  # (K,)
        quantized = quantized.view(b, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)  # (B, D, h, w)
        stats = {"perplexity": perplexity(counts), "usage": (counts > 0).float().mean()}
        return QuantizerOutput(quantized, indices.view(b, h, w), {}, stats)


@hookimpl
def register_quantizers(register):
    """Register the finite scalar quantizer: fsq."""
    register(FSQ)
