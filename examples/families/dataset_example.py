"""The bars problem (Foldiak 1990): S x S binary images in which each of the S horizontal and S vertical bars is
present with probability 1/S, generated from a seed, so the dataset has no files to download."""
import torch
from pydantic import Field

from vaeflow.core.bounds import MAX_IMAGES, MAX_SEED, MAX_SIDE
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Dataset, Options


class Bars(Dataset):
    """float (N, 1, S, S) images in {0, 1}."""

    name = "bars"
    GENERATED = True  # drawn from the seed: no file is read, so sources() lists none

    class Options(Options):
        size: int = Field(
            8, ge=2, le=MAX_SIDE, description="S, the side of the images and the number of bars per direction")
        n_train: int = Field(2048, gt=0, le=MAX_IMAGES, description="number of training images")
        n_test: int = Field(256, gt=0, le=MAX_IMAGES, description="number of test images")
        seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the bars; train and test use separate streams")

    @property
    def shape(self):
        return (1, self.options.size, self.options.size)

    def tensors(self, split):
        o = self.options
        g = torch.Generator().manual_seed(2 * o.seed + self.SPLITS.index(split))  # one stream per split
        n = o.n_train if split == "train" else o.n_test
        rows, cols = (torch.rand(2, n, o.size, generator=g) < 1 / o.size).float()  # (N, S) each
        return torch.maximum(rows[:, :, None], cols[:, None, :])[:, None]  # (N, 1, S, S)


@hookimpl
def register_datasets(register):
    register(Bars)
