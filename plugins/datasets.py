"""Built-in datasets: Fashion-MNIST, MNIST, procedural dSprites-like shapes, and a folder of images.

Fashion-MNIST (Xiao et al. 2017) and MNIST (LeCun et al. 1998) are read from the four IDX files,
found in ``data.dataset.root`` when it is set (and only there: a root the user names must hold them), else in
``$VAEFLOW_DATA_DIR/<Name>`` (default ``~/.cache/vaeflow/data/<Name>``), then the Debian package folder
(``apt-get install dataset-fashion-mnist``). Gzipped files are decompressed once into the cache, atomically.

``shapes`` renders (near-)binary images with known generative factors in the spirit of dSprites
(Matthey et al. 2017), so disentanglement can be measured without downloading anything.
``image-folder`` reads the user's own images, in memory or lazily one file per item.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from vaeflow.core.bounds import MAX_IMAGES, MAX_SEED, MAX_SIDE
from vaeflow.core.errors import DataError
from vaeflow.core.files import atomic_write
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Dataset, Shape, file_sha256, to_unit_float
from vaeflow.core.interfaces import Options as ComponentOptions

ENV_DATA_DIR = "VAEFLOW_DATA_DIR"


def data_dir() -> Path:
    """Where downloads and decompressed files go: $VAEFLOW_DATA_DIR, else ~/.cache/vaeflow/data."""
    return Path(os.environ.get(ENV_DATA_DIR) or "~/.cache/vaeflow/data").expanduser()


def _check_split(split: str) -> None:
    if split not in Dataset.SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(Dataset.SPLITS)}")


# -----------------------------------------------------------------------------
# Fashion-MNIST and MNIST: 28x28 grayscale images in the IDX format

IDX_FILES = {  # split -> (images, labels), the names every mirror and the Debian package use
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEFAULT_ROOTS: dict[str, list[str]] = {  # dataset name -> system folders searched last
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],  # Debian: dataset-fashion-mnist
    "mnist": ["/usr/share/datasets/mnist"],  # no Debian package ships MNIST yet
}


def _gzip_size(path: Path) -> int:
    """Uncompressed size mod 2**32, from a gzip file's trailer (RFC 1952 ISIZE)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def _gunzip(src: Path, dst: Path) -> None:
    """Decompress src to dst atomically (atomic_write: mode per the umask, as the cache may be shared); skip if
    fresh."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime and dst.stat().st_size == _gzip_size(src):
        return  # decompressed earlier from this very file

    def decompress(tmp: str) -> None:
        with open(tmp, "wb") as out, gzip.open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)

    try:
        atomic_write(dst, decompress)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot decompress {src} into {dst}: {e} (truncated or corrupt? fetch it again)") from e


class _IdxDataset(Dataset):
    """Base of the IDX-format datasets: find the files, decompress, read, check, cache."""

    folder: ClassVar[str]  # torchvision's class name, also the sub-folder under data_dir()
    package: ClassVar[Optional[str]] = None  # Debian package that ships the files, if any
    content_sha256: ClassVar[dict[str, str]] = {}  # file name -> sha256 of the uncompressed IDX bytes

    class Options(ComponentOptions):
        root: Optional[str] = Field(
            None, description="folder with the four IDX files (.gz or not); when set, the files are read from "
                              "there only, and a missing folder or file is an error"
        )

    def __init__(self, options: Options):
        super().__init__(options)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (images, labels)
        self._verified: dict[Path, int] = {}  # path -> mtime when its checksum matched

    @property
    def shape(self) -> Shape:
        """(1, 28, 28)."""
        return (1, 28, 28)

    def tensors(self, split: str) -> torch.Tensor:
        """Images of a split: uint8 (N, 1, 28, 28); N is 60000 for train, 10000 for test."""
        return self._load(split)[0]

    def labels(self, split: str) -> torch.Tensor:
        """Class labels of a split: int64 (N,) in 0..9."""
        return self._load(split)[1]

    def search_folders(self) -> list[Path]:
        """The folders searched for the IDX files, in order: only data.dataset.root's when it is set."""
        if self.options.root:
            root = Path(self.options.root).expanduser()
            return [root, root / self.folder / "raw"]
        cache = data_dir() / self.folder
        return [cache, cache / "raw"] + [Path(p) for p in DEFAULT_ROOTS.get(self.name, [])]

    def _unzipped_folder(self) -> Path:
        """Where .gz files are decompressed to: the cache's raw folder, or for data.dataset.root a folder of its own
        (keyed by the root's path), so that a root's files never stand in for the default copy or another root's."""
        cache = data_dir() / self.folder / "raw"
        if not self.options.root:
            return cache
        root = Path(self.options.root).expanduser().resolve()
        return cache.parent / "roots" / hashlib.sha256(str(root).encode()).hexdigest()[:16]

    def _check_root(self) -> None:
        """A data.dataset.root that is set must be an existing folder; a DataError naming the field otherwise."""
        if not self.options.root:
            return
        root = Path(self.options.root).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(f"data.dataset.root: {root} {what}. Set it to the folder holding the {self.name} IDX "
                            f"files, or leave it unset to use {data_dir() / self.folder} and the system copy")

    def _find(self) -> Optional[dict[str, Path]]:
        """{file name: path} from the first folder holding all four files, plain preferred over .gz."""
        for folder in self.search_folders():
            found = {}
            for name in (n for pair in IDX_FILES.values() for n in pair):
                plain, gz = folder / name, folder / f"{name}.gz"
                found[name] = plain if plain.is_file() else gz if gz.is_file() else None
            if all(found.values()):
                return found
        return None

    def _download(self) -> None:
        """Let torchvision fetch the files into data_dir()/<folder>/raw (fails offline)."""
        from torchvision.datasets import mnist as tv_mnist

        getattr(tv_mnist, self.folder)(root=str(data_dir()), train=True, download=True)

    def _locate(self) -> dict[str, Path]:
        """Paths of the four uncompressed files, downloading or decompressing as needed."""
        self._check_root()
        found = self._find()
        if found is None and self.options.root:
            raise DataError(self._missing_message(None))  # a named root is used as it is: no download into the cache
        if found is None:
            try:
                self._download()
                error = "torchvision reported success, yet the files are missing"
            except Exception as e:  # offline, mirror down, disk full ...
                error = " ".join(f"{type(e).__name__}: {e}".split())
            found = self._find()
            if found is None:
                raise DataError(self._missing_message(error))
        cache = self._unzipped_folder()
        for name, path in found.items():
            if path.suffix == ".gz":
                found[name] = cache / name
                _gunzip(path, found[name])
        self._verify(found)
        return found

    def _verify(self, plain: dict[str, Path]) -> None:
        """Check the uncompressed files against the known sha256s; a mismatch is a corrupt file."""
        for name, path in plain.items():
            want = self.content_sha256.get(name)
            if want is None or self._verified.get(path) == path.stat().st_mtime_ns:
                continue
            got = file_sha256(path)
            if got != want:
                raise DataError(f"{path}: checksum mismatch (sha256 {got[:16]}..., expected {want[:16]}...); "
                                f"the file is corrupt or truncated: delete it and fetch it again")
            self._verified[path] = path.stat().st_mtime_ns

    def sources(self) -> list[Path]:
        """The four IDX files as found (before decompression), for the data manifest."""
        self._check_root()
        found = self._find()
        if found is None:
            self._locate()  # downloads, or raises the DataError that says how to get the files
            found = self._find()
        return [found[name] for pair in IDX_FILES.values() for name in pair]

    def _missing_message(self, download_error: Optional[str]) -> str:
        """What was searched, which files are needed, and how to get them (download_error None: a named root)."""
        names = ", ".join(n for pair in IDX_FILES.values() for n in pair)
        if download_error is None:
            lines = [f"{self.name}: data.dataset.root is {Path(self.options.root).expanduser()}, which does not hold "
                     f"the IDX files. Searched:"]
        else:
            lines = [f"{self.name}: the IDX files were not found. Searched:"]
        lines += [f"  {folder}" for folder in self.search_folders()]
        lines.append(f"Needed, each plain or .gz: {names}.")
        if download_error is None:
            lines.append("Put them there, or leave data.dataset.root unset to use the cache and the system copy.")
        else:
            how = f"Get them with `apt-get install {self.package}` (Debian/Ubuntu), or download them" if self.package \
                else "Download them"
            lines += [f"{how} and set data.dataset.root to their folder.",
                      f"Automatic download into {data_dir() / self.folder} failed: {download_error}"]
        return "\n".join(lines)

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read, check and cache one split as (uint8 (N, 1, 28, 28), int64 (N,))."""
        _check_split(split)
        if split not in self._cache:
            from torchvision.datasets.mnist import read_image_file, read_label_file

            paths = self._locate()
            image_path, label_path = (paths[name] for name in IDX_FILES[split])
            images = _read_idx(read_image_file, image_path)  # (N, 28, 28) uint8
            labels = _read_idx(read_label_file, label_path)  # (N,) int64
            if images.shape[1:] != (28, 28) or len(images) != len(labels):
                raise DataError(
                    f"{image_path}: {tuple(images.shape)} images do not match 28x28 with "
                    f"{len(labels)} labels from {label_path}"
                )
            self._cache[split] = (images.unsqueeze(1), labels.long())  # (N, 1, 28, 28), (N,)
        return self._cache[split]


def _read_idx(reader, path: Path) -> torch.Tensor:
    """Run a torchvision IDX reader, turning any failure into a DataError that names the file."""
    try:
        return reader(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a valid IDX file ({type(e).__name__}: {e}); fetch it again") from e


class FashionMNIST(_IdxDataset):
    """Fashion-MNIST (Xiao et al. 2017): 70000 28x28 grayscale clothes in 10 classes."""

    # sha256 of the uncompressed IDX files, read off Debian's dataset-fashion-mnist (its .gz files
    # are recompressed, so only the uncompressed bytes can be compared across mirrors)
    content_sha256 = {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }

    name = "fashion-mnist"
    folder = "FashionMNIST"
    package = "dataset-fashion-mnist"


class MNIST(_IdxDataset):
    """MNIST (LeCun et al. 1998): 70000 28x28 grayscale handwritten digits."""

    name = "mnist"
    folder = "MNIST"


# -----------------------------------------------------------------------------
# Shapes: procedural dSprites-like images with known generative factors

SHAPE_NAMES = ("square", "ellipse", "heart", "triangle")  # shape_id -> name
FACTOR_NAMES = ("shape", "scale", "rotation", "x", "y")  # columns of Shapes.factors
RADIUS = 0.25  # circumradius of a shape at scale 1, as a fraction of the image size
HEART_CY, HEART_R = 0.2935, 1.2932  # centroid height and max centroid distance of the heart curve


def margin(size: int) -> float:
    """Pixels kept free at each border so that every shape, at any scale and rotation, fits."""
    return RADIUS * size + 1.0


def position_to_pixel(position: torch.Tensor, size: int) -> torch.Tensor:
    """Factor x or y in [0, 1] -> shape centroid in pixel-index units (pixel i is centred at i)."""
    m = margin(size)
    return m + position * (size - 1 - 2 * m)


# Inside-tests in the shape's own frame: u right, v down, centroid at 0, circumradius <= 1.
def _square(u, v):
    return torch.maximum(u.abs(), v.abs()) <= 1 / math.sqrt(2)


def _ellipse(u, v):
    return u * u + 4 * v * v <= 1  # semi-axes 1 and 1/2


def _heart(u, v):  # (x^2 + y^2 - 1)^3 <= x^2 y^3 with y up, moved to its centroid and shrunk to fit
    x, y = u * HEART_R, HEART_CY - v * HEART_R
    x2, r = x * x, x * x + y * y - 1
    return r * r * r <= x2 * y * y * y


def _triangle(u, v):  # equilateral, apex up: inside iff (u, v) projects <= the inradius 1/2 on each edge normal
    a, b = (math.sqrt(3) / 2) * u, v / 2  # the normals are (0, 1), (sqrt(3)/2, -1/2), (-sqrt(3)/2, -1/2)
    return (v <= 0.5) & (a - b <= 0.5) & (-a - b <= 0.5)


SHAPE_TESTS = (_square, _ellipse, _heart, _triangle)  # indexed by shape_id


def shape_frame(factors: torch.Tensor, grid: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample points grid (G,), in pixel units, seen in each shape's own frame: (u, v), each (B, G, G)."""
    _, scale, rotation, x, y = (c[:, None, None] for c in factors.unbind(1))  # each (B, 1, 1)
    radius = scale * RADIUS * size  # (B, 1, 1) circumradius in pixels
    dx = (grid[None, None, :] - position_to_pixel(x, size)) / radius  # (B, 1, G) along columns
    dy = (grid[None, :, None] - position_to_pixel(y, size)) / radius  # (B, G, 1) along rows
    cos, sin = rotation.cos(), rotation.sin()
    return cos * dx + sin * dy, cos * dy - sin * dx  # (B, G, G) each


def render_shapes(factors: torch.Tensor, size: int) -> torch.Tensor:
    """Rasterise factor rows [shape_id, scale, rotation, x, y] (N, 5) -> float (N, 1, S, S) in [0, 1].

    Images of 32 pixels or more are binary (pixel centre inside the shape); smaller ones average
    k x k samples per pixel (k = ceil(32 / S)) so that tiny shapes still show, with grey edges.
    """
    factors, k = factors.float(), math.ceil(32 / size)
    grid = (torch.arange(size * k, dtype=torch.float32) + 0.5) / k - 0.5  # (S k,) sample points, pixel units
    chunk = max(1, (1 << 18) // len(grid) ** 2)  # images per chunk: ~1 MB of samples stays in cache
    images = torch.zeros(len(factors), 1, size, size)  # (N, 1, S, S)
    for shape_id, inside in enumerate(SHAPE_TESTS):
        for idx in (factors[:, 0] == shape_id).nonzero().squeeze(1).split(chunk):  # chunks of (B,) indices
            samples = inside(*shape_frame(factors[idx], grid, size)).float()  # (B, S k, S k)
            images[idx, 0] = samples.view(-1, size, k, size, k).mean((2, 4))  # (B, S, S)
    return images


class Shapes(Dataset):
    """dSprites-like shapes (Matthey et al. 2017) with known factors, generated from a seed."""

    name = "shapes"
    GENERATED = True  # drawn from the options' seed: nothing is read
    FACTOR_NAMES = FACTOR_NAMES
    FACTOR_DISCRETE = (True, False, False, False, False)  # shape is categorical; scale, rotation, x, y ordered

    class Options(ComponentOptions):
        image_size: int = Field(32, ge=8, le=MAX_SIDE, description="side S of the square images, in pixels")
        n_train: int = Field(10000, gt=0, le=MAX_IMAGES, description="number of training images")
        n_test: int = Field(2000, gt=0, le=MAX_IMAGES, description="number of test images")
        seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the factors; train and test use separate streams")

    def __init__(self, options: Options):
        super().__init__(options)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (images, factors)

    @property
    def shape(self) -> Shape:
        """(1, S, S)."""
        return (1, self.options.image_size, self.options.image_size)

    def tensors(self, split: str) -> torch.Tensor:
        """Images of a split: float (N, 1, S, S) in [0, 1], binary when S >= 32."""
        return self._generate(split)[0]

    def factors(self, split: str) -> torch.Tensor:
        """Factors of a split: float (N, 5), columns FACTOR_NAMES = shape_id, scale, rotation, x, y."""
        return self._generate(split)[1]

    def labels(self, split: str) -> torch.Tensor:
        """The shape of each image as its class label: int64 (N,) in 0..3 (SHAPE_NAMES)."""
        return self._generate(split)[1][:, 0].long()

    def _generate(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample factors uniformly and render them, once per split."""
        _check_split(split)
        if split not in self._cache:
            o = self.options
            n = o.n_train if split == "train" else o.n_test
            g = torch.Generator().manual_seed(2 * o.seed + Dataset.SPLITS.index(split))  # one stream per split
            factors = torch.stack(
                [
                    torch.randint(len(SHAPE_NAMES), (n,), generator=g).float(),  # shape_id
                    0.5 + 0.5 * torch.rand(n, generator=g),  # scale in [0.5, 1]
                    2 * math.pi * torch.rand(n, generator=g),  # rotation in [0, 2 pi) radians
                    torch.rand(n, generator=g),  # x in [0, 1], left to right
                    torch.rand(n, generator=g),  # y in [0, 1], top to bottom
                ],
                dim=1,
            )  # (N, 5)
            self._cache[split] = (render_shapes(factors, o.image_size), factors)
        return self._cache[split]


# -----------------------------------------------------------------------------
# ImageFolder: the user's own images

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Read one file as uint8 (C, size, size): centre square crop, then a bilinear resize."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            side = min(w, h)
            box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError ... for bad files
        raise DataError(f"image-folder: cannot read image {path}: {type(e).__name__}: {e}") from e
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (S, S) or (S, S, 3)
    return pixels.reshape(size, size, channels).permute(2, 0, 1).contiguous()  # (C, S, S)


class _ImageFileDataset(torch.utils.data.Dataset):
    """Lazy map-style dataset: reads one file per item -> float (C, S, S) in [0, 1]."""

    def __init__(self, files: list[Path], channels: int, size: int):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_unit_float(load_image(self.files[i], self.channels, self.size))  # (C, S, S)


class ImageFolder(Dataset):
    """Every image under a folder (recursively), centre-cropped and resized, split by a seeded permutation."""

    name = "image-folder"

    class Options(ComponentOptions):
        root: str = Field(description=f"folder searched recursively for {', '.join(EXTENSIONS)} files")
        image_size: int = Field(64, ge=4, le=MAX_SIDE, description="side S the images are cropped and resized to")
        channels: Literal[1, 3] = Field(3, description="1 for grayscale, 3 for RGB")
        test_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of the images held out for test")
        seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the train/test permutation")
        follow_symlinks: bool = Field(False, description="read symlinked images whose target lies outside root "
                                                         "(links within root are always read)")

    def __init__(self, options: Options):
        super().__init__(options)
        self._files: Optional[list[Path]] = None  # every image under root, sorted
        self._splits: Optional[dict[str, list[Path]]] = None  # split -> files
        self._cache: dict[str, torch.Tensor] = {}  # split -> uint8 (N, C, S, S)

    @property
    def shape(self) -> Shape:
        """(C, S, S)."""
        return (self.options.channels, self.options.image_size, self.options.image_size)

    def files(self, split: str) -> list[Path]:
        """The image files of a split, in sorted order."""
        _check_split(split)
        if self._splits is None:
            self._splits = self._split(self.sources())
        return self._splits[split]

    def sources(self) -> list[Path]:
        """Every image file under root (both splits), sorted: the data manifest hashes their contents."""
        if self._files is None:
            self._files = self._scan()
        return self._files

    def tensors(self, split: str) -> torch.Tensor:
        """All images of a split in memory: uint8 (N, C, S, S)."""
        if split not in self._cache:
            c, s = self.options.channels, self.options.image_size
            images = [load_image(f, c, s) for f in self.files(split)]  # each (C, S, S)
            self._cache[split] = torch.stack(images)  # (N, C, S, S)
        return self._cache[split]

    def torch_dataset(self, split: str) -> torch.utils.data.Dataset:
        """A lazy dataset reading one file per item, for folders too large for memory."""
        return _ImageFileDataset(self.files(split), self.options.channels, self.options.image_size)

    def _scan(self) -> list[Path]:
        """Sorted image files under root, or a DataError saying what was looked for."""
        root, exts = Path(self.options.root).expanduser(), ", ".join(EXTENSIONS)
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataError(
                f"image-folder: data.dataset.root: {root} {what}; set it to a folder of {exts} images"
            )
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not self.options.follow_symlinks:
            self._refuse_outside_links(root, files)
        if len(files) < 2:
            raise DataError(
                f"image-folder: found {len(files)} image(s) under {root}, need at least 2 "
                f"(extensions {exts}, searched recursively)"
            )
        return files

    @staticmethod
    def _refuse_outside_links(root: Path, files: list[Path]) -> None:
        """A DataError naming each symlinked image whose target lies outside root: reading files from elsewhere must
        be asked for (follow_symlinks: true). Links within root are fine."""
        inside = root.resolve()
        outside = [(f, target) for f in files if not (target := f.resolve()).is_relative_to(inside)]
        if outside:
            shown = "\n".join(f"  {link} -> {target}" for link, target in outside[:10])
            more = f"\n  ... and {len(outside) - 10} more" if len(outside) > 10 else ""
            raise DataError(f"image-folder: {len(outside)} image(s) under {root} are symlinks to files outside it:\n"
                            f"{shown}{more}\nRemove the links or copy the files in, or set "
                            f"data.dataset.follow_symlinks: true to read them")

    def _split(self, files: list[Path]) -> dict[str, list[Path]]:
        """Hold out round(test_fraction * N) images (at least 1, at most N - 1) by a seeded permutation."""
        n = len(files)
        n_test = min(n - 1, max(1, round(self.options.test_fraction * n)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.options.seed))  # (N,)
        test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
        return {"train": [files[i] for i in train.tolist()], "test": [files[i] for i in test.tolist()]}


@hookimpl
def register_datasets(register):
    """Register the built-in datasets."""
    for cls in (FashionMNIST, MNIST, Shapes, ImageFolder):
        register(cls)
