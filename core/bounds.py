"""Sane upper bounds of counts and sizes, for the core config and for plugins' options alike.

Each is far above any real run (a million epochs of one step at a thousand steps a second is over ten days; a layer
of 65,536 units is past any VAE's), and low enough that a typo (1e29, an extra zero or three) is a config error that
names the field, not a run that would outlast the machine or exhaust its memory. A third-party plugin bounds its
own counts with the same names: `hidden: list[Width]`, `Field(..., le=MAX_IMAGES)`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

MAX_EPOCHS = 1_000_000
MAX_STEPS = 10**10  # steps in total (warm-up, max_steps, intervals, schedules)
MAX_BATCH = 2**20  # images per batch
MAX_IMAGES = 10**9  # images in a dataset, or scored, rendered or sampled
MAX_SEED = 2**62  # torch takes 64-bit seeds, and the engine derives seed + 1
MAX_WORKERS = 1024  # processes or threads
MAX_WIDTH = 2**16  # units or channels of one layer
MAX_DEPTH = 1024  # layers, blocks or iterations of one component
MAX_SIDE = 2**14  # pixels on one side of an image (16,384: a 1 GiB float32 image)
MAX_LATENT = 2**16  # latent dimensions J
MAX_CODES = 2**24  # entries of one codebook (an FSQ's levels multiply to its size)
MAX_GRID = 1024  # rows, columns or frames of one rendered figure

Width = Annotated[int, Field(gt=0, le=MAX_WIDTH)]  # a layer's units or channels
