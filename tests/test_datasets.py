"""Built-in datasets checked against facts computed independently of plugins/datasets.py."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaeflow.core.errors import DataError
from vaeflow.plugins import datasets
from vaeflow.plugins.datasets import MNIST, FashionMNIST, ImageFolder, Shapes

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
needs_debian = pytest.mark.skipif(
    not all((DEBIAN / f"{n}.gz").is_file() for n in IDX_NAMES),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test caches under tmp_path, never in $HOME, and never downloads."""
    monkeypatch.setenv("VAEFLOW_DATA_DIR", str(tmp_path / "cache"))

    def no_download(self):
        raise RuntimeError("offline in tests")

    monkeypatch.setattr(datasets._IdxDataset, "_download", no_download)
    return tmp_path / "cache"


# -----------------------------------------------------------------------------
# shapes


def make_shapes(**kw) -> Shapes:
    return Shapes(Shapes.Options(**kw))


def test_shapes_deterministic_and_splits_differ():
    a = make_shapes(n_train=200, n_test=200, seed=3)
    b = make_shapes(n_train=200, n_test=200, seed=3)
    c = make_shapes(n_train=200, n_test=200, seed=4)
    x = a.tensors("train")
    assert x.shape == (200, 1, 32, 32) and x.dtype == torch.float32
    assert a.shape == (1, 32, 32)
    assert torch.equal(x, b.tensors("train"))
    assert torch.equal(a.factors("test"), b.factors("test"))
    assert not torch.equal(x, c.tensors("train"))
    assert torch.cdist(a.factors("train"), a.factors("test")).min() > 1e-3, "train and test share no sample"
    assert torch.cdist(a.factors("test"), c.factors("train")).min() > 1e-3
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert (x.flatten(1).sum(1) > 0).all(), "every image shows a shape"
    assert set(x.unique().tolist()) == {0.0, 1.0}, "binary at 32 pixels"


def lit_moments(image: torch.Tensor) -> tuple[float, float, float]:
    """Variance along columns, along rows, and their covariance, of the lit pixels of (S, S)."""
    rows, cols = image.nonzero(as_tuple=True)
    rows, cols = rows.float() - rows.float().mean(), cols.float() - cols.float().mean()
    return (cols**2).mean().item(), (rows**2).mean().item(), (cols * rows).mean().item()


def test_shapes_rotation_convention():
    # ellipse (major axis along x at rotation 0) and triangle (apex up) in the middle of a 64-pixel image
    rot = torch.tensor([0.0, math.pi / 2, math.pi / 4, 0.0, math.pi])
    shape_id, centre = torch.tensor([1.0, 1, 1, 3, 3]), torch.full((5,), 0.5)
    f = torch.stack([shape_id, torch.ones(5), rot, centre, centre], 1)  # (5, 5)
    x = datasets.render_shapes(f, 64)[:, 0]  # (5, 64, 64)
    var_c, var_r, _ = lit_moments(x[0])
    assert var_c > 3 * var_r, "rotation 0: the ellipse lies along x"
    var_c, var_r, _ = lit_moments(x[1])
    assert var_r > 3 * var_c, "rotation pi/2: the ellipse stands along y"
    _, _, cov = lit_moments(x[2])
    assert cov > 0, "rotation turns from +x towards +y (rows grow downwards): top-left to bottom-right"
    width = x[3].sum(1)  # (S,) lit pixels per row
    top, bottom = width.nonzero()[0].item(), width.nonzero()[-1].item()
    assert width[top + 2] < width[bottom - 2], "rotation 0: the triangle points up"
    assert (x[4] != x[3].flip(0)).sum() <= 4, "rotation pi: the triangle points down"


def test_small_shapes_are_never_empty():
    x = make_shapes(image_size=8, n_train=3000).tensors("train")
    assert x.shape == (3000, 1, 8, 8)
    assert x.flatten(1).amax(1).min() > 0.2
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_shapes_factor_ranges():
    f = make_shapes(n_train=2000).factors("train")
    assert f.shape == (2000, 5)
    assert set(f[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert f[:, 1].min() >= 0.5 and f[:, 1].max() <= 1.0
    assert f[:, 2].min() >= 0 and f[:, 2].max() < 2 * math.pi
    assert f[:, 3:].min() >= 0 and f[:, 3:].max() <= 1


@pytest.mark.parametrize("size", [8, 32, 48])
def test_shapes_centroid_matches_xy_factors(size):
    ds = make_shapes(image_size=size, n_train=1000)
    x, f = ds.tensors("train")[:, 0], ds.factors("train")  # (N, S, S), (N, 5)
    # documented contract: centroid pixel = m + pos * (S - 1 - 2m), m = S/4 + 1, pixel i centred at i
    m = size / 4 + 1
    want_col, want_row = m + f[:, 3] * (size - 1 - 2 * m), m + f[:, 4] * (size - 1 - 2 * m)
    idx = torch.arange(size, dtype=torch.float32)
    mass = x.sum((1, 2))
    col = (x.sum(1) * idx).sum(1) / mass
    row = (x.sum(2) * idx).sum(1) / mass
    err = torch.maximum((col - want_col).abs(), (row - want_row).abs())
    tol = 1.0 if size >= 32 else 1.5  # 8x8 shapes are only a few pixels across
    assert err.max() < tol, f"worst centroid error {err.max():.2f} px"
    if size >= 32:
        assert err.mean() < 0.25
    for k in range(4):  # no shape is systematically off-centre (the heart is the asymmetric one)
        sel = f[:, 0] == k
        assert (col - want_col)[sel].mean().abs() < 0.15 and (row - want_row)[sel].mean().abs() < 0.15


def test_shapes_stay_inside_the_frame():
    x = make_shapes(image_size=16, n_train=3000).tensors("train")[:, 0]
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)
    assert border.sum() == 0


def test_shapes_area_follows_scale():
    ds = make_shapes(image_size=32, n_train=4000)
    x, f = ds.tensors("train"), ds.factors("train")
    lit = x.flatten(1).sum(1)
    radius = f[:, 1] * 32 / 4  # circumradius in pixels
    for k in range(4):
        sel = f[:, 0] == k
        small, large = lit[sel & (f[:, 1] < 0.75)], lit[sel & (f[:, 1] >= 0.75)]
        assert large.mean() > 1.5 * small.mean()
    # exact areas in units of circumradius^2: square 2, ellipse (semi-axes 1, 1/2) pi/2, triangle 3*sqrt(3)/4
    for k, area in [(0, 2.0), (1, math.pi / 2), (3, 3 * math.sqrt(3) / 4)]:
        sel = f[:, 0] == k
        ratio = (lit[sel] / (area * radius[sel] ** 2)).mean()
        assert abs(ratio - 1) < 0.05, (k, ratio)


def test_shapes_unknown_split():
    with pytest.raises(DataError, match="valid"):
        make_shapes().tensors("valid")


def test_shapes_options_validate():
    with pytest.raises(ValueError):
        Shapes.Options(image_size=4)
    with pytest.raises(ValueError):
        Shapes.Options(n_train=0)
    with pytest.raises(ValueError):
        Shapes.Options(colour="red")


# -----------------------------------------------------------------------------
# Fashion-MNIST / MNIST


def read_idx_gz(path: Path) -> np.ndarray:
    """Independent IDX reader: big-endian header (magic, dims), then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_debian
def test_fashion_mnist_from_debian_files(isolated_cache):
    ds = FashionMNIST(FashionMNIST.Options())
    assert ds.shape == (1, 28, 28)
    train, test = ds.tensors("train"), ds.tensors("test")
    assert train.shape == (60000, 1, 28, 28) and test.shape == (10000, 1, 28, 28)
    assert train.dtype == torch.uint8
    ytr, yte = ds.labels("train"), ds.labels("test")
    assert ytr.dtype == torch.int64 and ytr.shape == (60000,)
    assert ytr.bincount().tolist() == [6000] * 10
    assert yte.bincount().tolist() == [1000] * 10
    want = read_idx_gz(DEBIAN / "train-images-idx3-ubyte.gz")
    assert want.shape == (60000, 28, 28)
    assert np.array_equal(train[0, 0].numpy(), want[0])
    assert np.array_equal(test[-1, 0].numpy(), read_idx_gz(DEBIAN / "t10k-images-idx3-ubyte.gz")[-1])
    assert ytr[:5].tolist() == read_idx_gz(DEBIAN / "train-labels-idx1-ubyte.gz")[:5].tolist()
    # decompressed once into the cache; a new instance reads from there
    assert (isolated_cache / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 784
    assert ds.tensors("train") is train
    assert torch.equal(FashionMNIST(FashionMNIST.Options()).labels("test"), yte)
    with pytest.raises(DataError, match="split"):
        ds.tensors("val")


@needs_debian
def test_truncated_gz_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {})
    root = tmp_path / "bad"
    root.mkdir()
    for name in IDX_NAMES:
        data = (DEBIAN / f"{name}.gz").read_bytes()
        (root / f"{name}.gz").write_bytes(data[: len(data) // 2] if name.startswith("train-images") else data)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        FashionMNIST(FashionMNIST.Options(root=str(root))).tensors("train")
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no partial file left behind"


def test_corrupt_idx_content_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {})
    root = tmp_path / "bad"
    root.mkdir()
    header = (2051).to_bytes(4, "big") + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (root / "t10k-images-idx3-ubyte").write_bytes(header + bytes(100))  # claims 5 images, holds 100 bytes
    (root / "t10k-labels-idx1-ubyte").write_bytes((2049).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(5))
    for name in IDX_NAMES[:2]:
        (root / name).write_bytes(b"")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        MNIST(MNIST.Options(root=str(root))).tensors("test")


def test_missing_files_message(tmp_path, monkeypatch, isolated_cache):
    system = tmp_path / "usr-share"
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {"fashion-mnist": [str(system)]})
    with pytest.raises(DataError) as err:
        FashionMNIST(FashionMNIST.Options()).tensors("train")
    msg = str(err.value)
    for folder in (isolated_cache / "FashionMNIST", system):
        assert str(folder) in msg
    for name in IDX_NAMES:
        assert name in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.dataset.root" in msg
    assert "offline in tests" in msg


def test_plain_and_gz_files_in_root(tmp_path, monkeypatch, isolated_cache):
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {})
    root = tmp_path / "tiny"
    root.mkdir()
    rng = np.random.default_rng(0)
    want = {}
    for prefix, split, n in [("train", "train", 7), ("t10k", "test", 3)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        dims = b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (root / f"{prefix}-images-idx3-ubyte").write_bytes((2051).to_bytes(4, "big") + dims + images.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
        )
        want[split] = images, labels
    ds = MNIST(MNIST.Options(root=str(root)))
    for split, (images, labels) in want.items():
        assert np.array_equal(ds.tensors(split)[:, 0].numpy(), images)
        assert ds.labels(split).tolist() == labels.tolist()
    unzipped = ds._unzipped_folder()  # a folder of this root's own under the cache
    assert unzipped.is_relative_to(isolated_cache / "MNIST") and unzipped != isolated_cache / "MNIST" / "raw"
    assert (unzipped / "t10k-labels-idx1-ubyte").is_file()  # only the .gz were cached
    assert not (unzipped / "t10k-images-idx3-ubyte").exists()


# -----------------------------------------------------------------------------
# image-folder

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 100, 50)]


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """12 solid-colour images of assorted sizes and formats in nested folders, plus a non-image."""
    root = tmp_path / "images"
    for i in range(12):
        folder = root / f"class{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        ext = [".png", ".jpg", ".PNG", ".bmp"][i % 4]
        colour = COLOURS[i % 4] if ext != ".jpg" else (128, 128, 128)  # jpeg is lossy: keep it grey
        Image.new("RGB", (20 + i, 16), colour).save(folder / f"img{i:02d}{ext}")
    (root / "notes.txt").write_text("not an image")
    return root


def opts(root, **kw):
    return ImageFolder.Options(root=str(root), image_size=8, **kw)


def test_image_folder_split_sizes_and_pixels(image_dir):
    ds = ImageFolder(opts(image_dir, test_fraction=0.25, seed=1))
    assert ds.shape == (3, 8, 8)
    train, test = ds.tensors("train"), ds.tensors("test")
    assert train.shape == (9, 3, 8, 8) and test.shape == (3, 3, 8, 8) and train.dtype == torch.uint8
    files = ds.files("train") + ds.files("test")
    assert len(set(files)) == 12 and all(f.suffix.lower() != ".txt" for f in files)
    for f, img in zip(ds.files("train"), train):
        with Image.open(f) as pil:
            colour = pil.convert("RGB").getpixel((0, 0))
        tol = 3 if f.suffix == ".jpg" else 0
        assert (img[:, 4, 4].int() - torch.tensor(colour)).abs().max() <= tol, f
    gray = ImageFolder(opts(image_dir, channels=1, test_fraction=0.25, seed=1)).tensors("train")
    assert gray.shape == (9, 1, 8, 8)


def test_image_folder_split_is_seeded(image_dir):
    a = ImageFolder(opts(image_dir, seed=0)).files("test")
    assert a == ImageFolder(opts(image_dir, seed=0)).files("test")
    assert len(a) == 1  # round(0.1 * 12)
    assert any(ImageFolder(opts(image_dir, seed=s)).files("test") != a for s in range(1, 6))


def test_image_folder_lazy_dataset_matches_tensors(image_dir):
    ds = ImageFolder(opts(image_dir, test_fraction=0.5))
    lazy = ds.torch_dataset("test")
    assert len(lazy) == 6
    images = ds.tensors("test")
    for i in range(len(lazy)):
        item = lazy[i]
        assert item.dtype == torch.float32 and item.shape == (3, 8, 8)
        assert torch.equal(item, images[i].float() / 255)
    loader = torch.utils.data.DataLoader(lazy, batch_size=4)
    assert next(iter(loader)).shape == (4, 3, 8, 8)


def test_image_folder_lazy_dataset_does_not_read_up_front(image_dir):
    ds = ImageFolder(opts(image_dir, test_fraction=0.5))
    lazy = ds.torch_dataset("train")
    bad = lazy.files[-1]
    bad.write_bytes(b"garbage")  # corrupted after listing: only the item that reads it fails
    assert lazy[0].shape == (3, 8, 8)
    with pytest.raises(DataError, match=bad.name):
        lazy[len(lazy) - 1]


def test_image_folder_errors(tmp_path, image_dir):
    with pytest.raises(DataError, match="nowhere"):
        ImageFolder(opts(tmp_path / "nowhere")).tensors("train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"\.png"):
        ImageFolder(opts(tmp_path / "empty")).tensors("train")
    (image_dir / "class0" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        ds = ImageFolder(opts(image_dir, test_fraction=0.5))
        ds.tensors("train"), ds.tensors("test")
    with pytest.raises(ValueError):
        ImageFolder.Options(root="x", channels=2)


# -----------------------------------------------------------------------------
# registration


def test_register_datasets_hook():
    got = []
    datasets.register_datasets(got.append)
    assert [c.name for c in got] == ["fashion-mnist", "mnist", "shapes", "image-folder"]
    for cls in got:
        assert issubclass(cls, datasets.Dataset)
        for name, field in cls.Options.model_fields.items():
            assert field.description, f"{cls.name}.{name} lacks a description"
