"""Getting a dataset split onto the training device, and iterating it in shuffled batches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from vaeflow.core.config import Config
from vaeflow.core.errors import DataError, VaeflowError
from vaeflow.core.interfaces import Dataset, to_unit_float
from vaeflow.core.registry import Registry, get_registry


def open_dataset(cfg: Config, registry: Registry | None = None) -> Dataset:
    """The dataset plugin instance named by data.dataset."""
    registry = registry or get_registry()
    cls = registry.get("dataset", cfg.data.dataset.name).cls
    return cls(cls.Options.model_validate(cfg.data.dataset.model_dump(exclude={"name"})))


def known_factors(cfg: Config, split: str = "test", registry: Registry | None = None) -> dict:
    """{"factors": (N, K) or None, "factor_names", "factor_discrete"}: the dataset's ground-truth factors, if any."""
    ds = open_dataset(cfg, registry)
    return {"factors": ds.factors(split), "factor_names": ds.FACTOR_NAMES, "factor_discrete": ds.FACTOR_DISCRETE}


def pad(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Zero-pad (N, C, H, W) images symmetrically to (N, C, size, size); None leaves them as they are."""
    if size is None:
        return images
    h, w = images.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def load_split(cfg: Config, split: str, device: torch.device | str = "cpu", registry: Registry | None = None) -> torch.Tensor:
    """A whole split as float images in [0, 1] on `device`, padded per data.pad_to: (N, C, H, W)."""
    ds = open_dataset(cfg, registry)
    images = ds.tensors(split)
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(ds.shape):
        raise DataError(f"dataset {cfg.data.dataset.name!r} split {split!r} has shape {tuple(images.shape)}, "
                        f"but declares images of shape {ds.shape}")
    return pad(to_unit_float(images.to(device)), cfg.data.pad_to)


class Batches:
    """Shuffled minibatches of one split; epochs are driven by an explicit permutation for exact resume.

    The memory path keeps the split on the device and gathers index batches (no per-sample Python).
    The stream path feeds the same index batches to a DataLoader with workers, for data that does
    not fit in memory.
    """

    def __init__(self, cfg: Config, split: str, device: torch.device, registry: Registry | None = None,
                 images: torch.Tensor | None = None):
        """`images`: already prepared (padded) split (N, C, H, W), e.g. from the pipeline's data cache."""
        self.cfg, self.device = cfg, device
        self.batch_size = cfg.train.batch_size
        if images is not None:
            self.images, self.n = to_unit_float(images.to(device)), len(images)
            self.stream = None
        elif cfg.data.loader == "memory":
            self.images = load_split(cfg, split, device, registry)  # (N, C, H, W)
            self.n = len(self.images)
        else:
            self.images = None
            self.stream = open_dataset(cfg, registry).torch_dataset(split)
            self.n = len(self.stream)
        if self.n == 0:
            raise DataError(f"dataset {cfg.data.dataset.name!r} split {split!r} is empty")

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return -(-self.n // self.batch_size)

    def epoch(self, perm: torch.Tensor, start: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Batches (B, C, H, W) in the order of `perm` (N,), from batch index `start`.

        With world > 1 (DDP), every rank walks the same global batches and keeps its own slice of each.
        """
        bs = self.batch_size

        def indices(i: int) -> torch.Tensor:
            idx = perm[i * bs : (i + 1) * bs]  # (B,) the global batch
            return idx.tensor_split(world)[rank] if world > 1 else idx

        if self.images is not None:  # memory path (also for prepared tensors)
            perm = perm.to(self.device)
            for i in range(start, len(self)):
                yield self.images[indices(i)]
            return
        index_batches = [indices(i).tolist() for i in range(start, len(self))]
        loader = torch.utils.data.DataLoader(
            self.stream, batch_sampler=index_batches, num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            generator=torch.Generator().manual_seed(self.cfg.train.seed),  # worker seeds; keeps the global RNG untouched
        )
        try:
            for batch in loader:
                yield pad(batch.to(self.device, non_blocking=True), self.cfg.data.pad_to)
        except VaeflowError as exc:  # raised in a worker: torch re-raises it with the worker's whole traceback
            try:
                unwrapped = type(exc)(worker_message(exc))
            except Exception:  # a subclass that takes other arguments
                unwrapped = DataError(worker_message(exc))
            raise unwrapped from None


def worker_message(exc: VaeflowError) -> str:
    """The original message of a user error raised in a DataLoader worker, which torch re-raises as
    "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\nmodule.DataError: <message>";
    the message as it is when the error was raised in this process."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if not text.startswith(f"Caught {type(exc).__name__} ") or marker not in text:
        return text
    return text.rsplit(marker, 1)[1].strip()  # the last exception of the chain is the one the worker raised
