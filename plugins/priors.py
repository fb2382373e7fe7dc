"""Built-in priors over VQ code grids: the gated PixelCNN.

van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders" (arXiv:1606.05328),
section 2.2 (gated layers, eq. 2), 2.3 (conditioning, eq. 4) and figure 2 (vertical and horizontal stacks,
which remove the blind spot of the original masked PixelCNN). Razavi et al. 2019, "Generating Diverse
High-Fidelity Images with VQ-VAE-2" (arXiv:1906.00446), use one such prior over the top codes and one over
the bottom codes conditioned on the top codes; `condition` selects the latter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from vaeflow.core.bounds import MAX_DEPTH, MAX_SIDE, MAX_WIDTH
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Prior


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) of the two channel halves (eq. 2): (B, 2C, h, w) -> (B, C, h, w)."""
    a, b = x.chunk(2, dim=1)  # (B, C, h, w) each
    return torch.tanh(a) * torch.sigmoid(b)


class CausalConv2d(nn.Module):
    """A convolution that sees only one side of each position: the kernels of the vertical and horizontal stacks.

    vertical: kernel (k//2+1, k); the output at row r sees rows r-k//2 .. r (`exclusive`: r-k//2-1 .. r-1),
    all within k//2 columns either side. horizontal: kernel (1, k//2+1); the output at (r, c) sees columns
    c-k//2 .. c of row r (`exclusive`, mask type "A": c-k//2-1 .. c-1). The one-sidedness comes from padding
    one side only and cropping, so no weight is masked and none wasted.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 direction: Literal["vertical", "horizontal"], exclusive: bool):
        super().__init__()
        half, shift = kernel_size // 2, int(exclusive)
        if direction == "vertical":
            kernel = (half + 1, kernel_size)
            self.pad = (half, half, half + shift, 0)  # F.pad order: left, right, top, bottom
        else:
            kernel = (1, half + 1)
            self.pad = (half + shift, 0, 0, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, C_out, h, w); `exclusive` drops the extra last row or column."""
        h, w = x.shape[-2:]
        return self.conv(F.pad(x, self.pad))[..., :h, :w]  # (B, C_out, h(+1), w(+1)) -> (B, C_out, h, w)


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack (figure 2), optionally conditioned (eq. 4).

    The vertical stack at row r sees only rows above r, so its 1x1 link into the horizontal stack is causal
    and carries the up-right neighbours: no blind spot. The first layer excludes the current position and has
    no residual on the horizontal stack, which would pass the current code straight to the output.
    """

    def __init__(self, channels: int, kernel_size: int, first: bool, conditioned: bool, dropout: float):
        super().__init__()
        self.vertical = CausalConv2d(channels, 2 * channels, kernel_size, "vertical", exclusive=first)
        self.horizontal = CausalConv2d(channels, 2 * channels, kernel_size, "horizontal", exclusive=first)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.condition = nn.Conv2d(channels, 4 * channels, 1) if conditioned else None  # V h and V' h of eq. 4
        self.dropout = nn.Dropout(dropout)
        self.residual = not first

    def forward(self, v: torch.Tensor, h: torch.Tensor,
                condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacks (B, C, h, w) each, condition features (B, C, h, w) or None -> new stacks (B, C, h, w) each."""
        v_pre = self.vertical(v)  # (B, 2C, h, w)
        h_pre = self.horizontal(h) + self.vertical_to_horizontal(v_pre)  # (B, 2C, h, w)
        if self.condition is not None:
            c_v, c_h = self.condition(condition).chunk(2, dim=1)  # (B, 2C, h, w) each
            v_pre, h_pre = v_pre + c_v, h_pre + c_h
        v_out = self.dropout(gate(v_pre))  # (B, C, h, w)
        h_out = self.horizontal_out(self.dropout(gate(h_pre)))  # (B, C, h, w)
        return v_out, h_out + h if self.residual else h_out


class ConditionBlock(nn.Module):
    """Non-causal residual block of the conditioning stack: x + 1x1(relu(3x3(relu(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, hc, wc) -> (B, C, hc, wc)."""
        return x + self.net(x)


class GatedPixelCNN(Prior):
    """Gated PixelCNN over a (h, w) grid of K codes (van den Oord et al. 2016), optionally conditioned on a
    coarser code grid (hc, wc) that divides it by an integer factor (the VQ-VAE-2 bottom prior)."""

    name = "gated-pixelcnn"

    class Options(Options):
        # 64, not the 128 of larger setups: forward + backward of a batch of 128 on 2 CPU cores, K = 512, takes
        # ~0.09 s (4x4 top) and ~0.33 s (8x8 bottom) at 64 channels, ~0.31 s and ~1.1 s at 128.
        channels: int = Field(
            64, gt=0, le=MAX_WIDTH, description="width of the embeddings, both stacks, the conditioning "
                                                "stack and the head")
        layers: int = Field(10, ge=1, le=MAX_DEPTH, description="gated layers; each widens the receptive field by "
                                                                "kernel_size // 2 rows and columns")
        kernel_size: int = Field(
            5, ge=3, le=MAX_SIDE, description="odd size k of the gated layers' kernels: (k//2+1, k) "
                                              "vertical, (1, k//2+1) horizontal")
        condition_layers: int = Field(
            2, ge=0, le=MAX_DEPTH, description="residual 3x3 blocks in the conditioning stack, which "
                                               "sees all conditioning codes (conditional priors only)")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the gated outputs of each layer")

        @field_validator("kernel_size")
        @classmethod
        def _odd(cls, k: int) -> int:
            """Only odd kernels are centred on a column."""
            if k % 2 == 0:
                raise ValueError(f"kernel_size must be odd (3, 5, 7, ...), got {k}")
            return k

    def __init__(self, options: Options, codebook_size: int, grid: tuple[int, int],
                 condition: tuple[int, tuple[int, int]] | None = None):
        super().__init__(options, codebook_size, grid, condition)
        channels, (h, w) = options.channels, self.grid
        self.embedding = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, options.kernel_size, first=i == 0, conditioned=condition is not None,
                       dropout=options.dropout)
            for i in range(options.layers)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1),
                                  nn.ReLU(), nn.Conv2d(channels, codebook_size, 1))
        self.condition_grid: tuple[int, int] | None = None
        if condition is not None:
            condition_size, (hc, wc) = condition
            if hc <= 0 or wc <= 0 or h % hc or w % wc or h // hc != w // wc:
                fits = ", ".join(f"{h // f}x{w // f}" for f in range(1, min(h, w) + 1) if h % f == 0 == w % f)
                raise ValueError(
                    f"gated-pixelcnn: the condition grid {hc}x{wc} must divide the code grid {h}x{w} by the same "
                    f"integer factor in both directions; condition grids that fit: {fits}")
            self.condition_grid, self.upsample = (hc, wc), h // hc
            self.condition_embedding = nn.Embedding(condition_size, channels)
            self.condition_stack = nn.Sequential(*(ConditionBlock(channels) for _ in range(options.condition_layers)))
            self.condition_global = nn.Linear(channels, channels)  # a summary of all conditioning codes, everywhere

    def _check(self, codes: torch.Tensor, condition: torch.Tensor | None) -> None:
        """ValueError for codes or a condition that do not fit this prior."""
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"gated-pixelcnn: expected codes of shape (B, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.dtype == torch.bool:
            raise ValueError(f"gated-pixelcnn: codes must be integer indices, got {codes.dtype}")
        if self.condition_grid is None:
            if condition is not None:
                raise ValueError("gated-pixelcnn: this prior is unconditional, but a condition was given")
            return
        if condition is None:
            raise ValueError(f"gated-pixelcnn: this prior is conditioned on a {self.condition_grid[0]}x"
                             f"{self.condition_grid[1]} code grid; pass condition=(B, hc, wc) codes")
        want = (codes.shape[0], *self.condition_grid)
        if tuple(condition.shape) != want:
            raise ValueError(f"gated-pixelcnn: expected a condition of shape {want}, got {tuple(condition.shape)}")

    def condition_features(self, condition: torch.Tensor) -> torch.Tensor:
        """Conditioning codes (B, hc, wc) -> features (B, C, h, w), each seeing all conditioning codes."""
        y = self.condition_embedding(condition.long()).permute(0, 3, 1, 2)  # (B, C, hc, wc)
        y = self.condition_stack(y)  # (B, C, hc, wc): local context
        y = y + self.condition_global(y.mean((2, 3)))[:, :, None, None]  # + global context: (B, C, hc, wc)
        return F.interpolate(y, scale_factor=self.upsample, mode="nearest")  # (B, C, h, w)

    def forward(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the K codes: codes (B, h, w) int64, condition (B, hc, wc) int64 -> (B, K, h, w)."""
        self._check(codes, condition)
        x = self.embedding(codes.long()).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w); int16 codes too
        features = self.condition_features(condition) if condition is not None else None  # (B, C, h, w)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, features)  # (B, C, h, w) each
        return self.head(h)  # (B, K, h, w)


@hookimpl
def register_priors(register):
    """Register the built-in priors."""
    register(GatedPixelCNN)
