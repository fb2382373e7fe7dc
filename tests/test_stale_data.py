"""Issue #14, data and store: a broken image in a streamed split, a named data root, a lookup in a folder with no
store, file modes under the umask, symlinks out of an image folder, and a manifest that covers every source file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaeflow.core.config import load_config
from vaeflow.core.errors import DataError, VaeflowError
from vaeflow.plugins import datasets
from vaeflow.plugins.datasets import MNIST, FashionMNIST, ImageFolder

from conftest import TINY, VAEFLOW, CrashAt


def vaeflow(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess."""
    return subprocess.run([VAEFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def make_images(root: Path, n: int, size: int = 12) -> list[Path]:
    """n grey PNG images of distinct shades under root; their paths, sorted."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.new("L", (size, size), 10 + 7 * i).save(root / f"img{i:02d}.png")
        paths.append(root / f"img{i:02d}.png")
    return paths


def folder_sets(root: Path, *extra: str) -> list[str]:
    return [f"data.dataset={{name: image-folder, root: {root}, image_size: 16, channels: 1, test_fraction: 0.25}}",
            "train.epochs=1", "train.progress=false", "train.batch_size=64", *extra]


# --- a broken image in a streamed split -------------------------------------------------------------------------
def test_stream_broken_image_prints_the_workers_message_and_leaves_no_run_folder(tmp_path):
    files = make_images(tmp_path / "images", 16)
    broken = files[::2]
    for f in broken:
        f.write_bytes(b"\x89PNG not really")  # 8 of 16: the train split (12 images, one batch) holds some
    out = tmp_path / "runs" / "broken"
    sets = folder_sets(tmp_path / "images", "data.loader=stream", "data.num_workers=2")
    res = vaeflow("train", str(TINY), "--out", str(out), *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "Caught" not in res.stderr and "worker" not in res.stderr, res.stderr
    assert "cannot identify image file" in res.stderr and any(str(f) in res.stderr for f in broken), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # the one original message
    assert not out.exists() and not (tmp_path / "runs").exists()  # no half-made run folder, nor its parent

    given = tmp_path / "given"  # an --out folder that existed: kept, with nothing of the failed run in it
    given.mkdir()
    (given / "notes.txt").write_text("mine")
    res = vaeflow("train", str(TINY), "--out", str(given), *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]


def test_resumed_run_keeps_its_folder_when_its_data_breaks(tmp_path):
    from vaeflow.core import engine
    from vaeflow.core.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint

    files = make_images(tmp_path / "images", 40)
    cfg = load_config(TINY, folder_sets(tmp_path / "images", "data.loader=stream", "data.num_workers=1",
                                        "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1"))
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.Trainer(cfg, run_dir, callbacks=[CrashAt(3)]).fit()
    assert load_checkpoint(run_dir / CHECKPOINT_FILE)["step"] == 2
    for f in files:
        f.write_bytes(b"broken")
    with pytest.raises(DataError) as err:
        engine.resume(run_dir)
    msg = str(err.value)
    assert msg.startswith("image-folder: cannot read image ") and "Caught" not in msg and "Traceback" not in msg
    assert (run_dir / CHECKPOINT_FILE).is_file() and (run_dir / CONFIG_FILE).is_file()  # resumable, never removed


# --- a data root the user names must exist and be used ---------------------------------------------------------
@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """An empty data cache, and no download (offline)."""
    monkeypatch.setenv("VAEFLOW_DATA_DIR", str(tmp_path / "cache"))

    def offline(self):
        raise RuntimeError("offline in tests")

    monkeypatch.setattr(datasets._IdxDataset, "_download", offline)
    return tmp_path / "cache"


def test_a_missing_root_is_an_error_naming_the_field_and_path_for_every_dataset(tmp_path):
    for dataset in ("fashion-mnist", "mnist", "image-folder"):
        res = vaeflow("train", str(TINY), "--out", str(tmp_path / "run"), "--set",
                      f"data.dataset={{name: {dataset}, root: /does/not/exist}}", "--set", "train.epochs=1",
                      cwd=tmp_path, env={"VAEFLOW_DATA_DIR": str(tmp_path / "cache")})
        assert res.returncode == 2, (dataset, res.stdout, res.stderr)
        assert "data.dataset.root" in res.stderr and "/does/not/exist" in res.stderr, res.stderr
        assert "does not exist" in res.stderr and "Traceback" not in res.stderr
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def write_idx(root: Path, seed: int, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    """Tiny MNIST-format files (train images plain, the rest gzipped) in root; {split: images}."""
    import gzip

    root.mkdir(parents=True)
    rng, out = np.random.default_rng(seed), {}
    for prefix, split, n in [("train", "train", n_train), ("t10k", "test", n_test)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        dims = b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        raw = (2051).to_bytes(4, "big") + dims + images.tobytes()
        (root / f"{prefix}-images-idx3-ubyte{'' if split == 'train' else '.gz'}").write_bytes(
            raw if split == "train" else gzip.compress(raw))
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n)
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
        out[split] = images
    return out


def test_a_named_root_is_used_and_never_falls_back_to_another_copy(tmp_path, monkeypatch, no_download):
    system = tmp_path / "system"
    system_images = write_idx(system, seed=0)
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {"mnist": [str(system)]})
    root = tmp_path / "mine"
    mine = write_idx(root, seed=1)
    ds = MNIST(MNIST.Options(root=str(root)))
    for split in ("train", "test"):
        assert np.array_equal(ds.tensors(split)[:, 0].numpy(), mine[split])
    assert all(Path(p).is_relative_to(root) for p in ds.sources())
    # the root's decompressed files never stand in for the default copy afterwards
    default = MNIST(MNIST.Options())
    assert np.array_equal(default.tensors("test")[:, 0].numpy(), system_images["test"])
    # an existing root without the files: an error naming the root, not the system copy
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        MNIST(MNIST.Options(root=str(tmp_path / "empty"))).tensors("train")
    msg = str(err.value)
    assert "data.dataset.root" in msg and str(tmp_path / "empty") in msg and "t10k-images-idx3-ubyte" in msg
    assert str(system) not in msg and "offline in tests" not in msg  # no fallback, no download


def test_missing_files_messages_read_right(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(datasets, "DEFAULT_ROOTS", {})
    with pytest.raises(DataError) as err:
        MNIST(MNIST.Options()).tensors("train")
    msg = str(err.value)
    assert "with download" not in msg and "Get them with download" not in msg
    assert "Download them and set data.dataset.root to their folder." in msg
    with pytest.raises(DataError) as err:
        FashionMNIST(FashionMNIST.Options()).tensors("train")
    assert ("Get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download them and set "
            "data.dataset.root to their folder.") in str(err.value)


# --- image-folder: symlinks out of the root --------------------------------------------------------------------
def test_image_folder_refuses_links_out_of_its_root_unless_asked(tmp_path):
    root = tmp_path / "images"
    make_images(root, 4)
    outside = make_images(tmp_path / "elsewhere", 1)[0]
    (root / "inside-link.png").symlink_to(root / "img00.png")  # within the root: fine
    opts = dict(root=str(root), image_size=8, channels=1)
    assert len(ImageFolder(ImageFolder.Options(**opts)).sources()) == 5
    (root / "sub").mkdir()
    link = root / "sub" / "outside.png"
    link.symlink_to(outside)
    with pytest.raises(DataError) as err:
        ImageFolder(ImageFolder.Options(**opts)).tensors("train")
    msg = str(err.value)
    assert f"{link} -> {outside}" in msg and "follow_symlinks" in msg
    followed = ImageFolder(ImageFolder.Options(**opts, follow_symlinks=True))
    assert link in followed.sources() and len(followed.tensors("train")) + len(followed.tensors("test")) == 6
    # through the CLI: exit 2 naming the link and its target
    res = vaeflow("train", str(TINY), "--out", str(tmp_path / "run"), "--set",
                  f"data.dataset={{name: image-folder, root: {root}, image_size: 16, channels: 1}}", cwd=tmp_path)
    assert res.returncode == 2 and str(link) in res.stderr and str(outside) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "run").exists()


# --- file modes follow the umask -------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    from vaeflow.core.checkpoint import save_weights, write_text
    from vaeflow.plugins.datasets import _gunzip

    import gzip

    (tmp_path / "src.gz").write_bytes(gzip.compress(b"idx bytes"))
    old = os.umask(umask)
    try:
        write_text(tmp_path / "config.yaml", "a: 1\n")
        save_weights(tmp_path / "model.safetensors", torch.nn.Linear(2, 2), {})
        _gunzip(tmp_path / "src.gz", tmp_path / "cache" / "src")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() makes under this umask: the reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == mode
    for name in ("config.yaml", "model.safetensors", "cache/src"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert not list(tmp_path.rglob("*.tmp"))


# --- a lookup never creates a store ----------------------------------------------------------------------------
def test_looking_up_a_model_where_there_is_no_store_creates_nothing(tmp_path):
    parent = tmp_path / "project"
    (parent / "sub").mkdir(parents=True)
    (parent / "mlflow.db").write_bytes(b"")  # a store in a parent folder: named as what the user may have meant
    env = {"VAEFLOW_HOME": str(parent / "sub")}
    for args in (["generate", "--model", "models:/nope@champion", "-n", "4", "--out", str(tmp_path / "s.png")],
                 ["evaluate", "--model", "models:/nope/1"], ["models", "list"], ["models", "promote", "nope", "1"]):
        res = vaeflow(*args, cwd=parent / "sub", env=env)
        assert res.returncode == 2, (args, res.stderr)
        assert f"there is no MLflow store at sqlite:///{parent / 'sub' / 'mlflow.db'}" in res.stderr, res.stderr
        assert f"a store exists at {parent / 'mlflow.db'}" in res.stderr and "VAEFLOW_HOME" in res.stderr
        assert "Traceback" not in res.stderr
        assert list((parent / "sub").iterdir()) == [], args  # no mlflow.db, no lock file, no mlruns
    assert not (tmp_path / "s.png").exists()


def test_load_model_from_python_where_there_is_no_store_creates_nothing(tmp_path):
    """vaeflow.load_model('models:/...') goes through MLflow's own default store (sqlite:///mlflow.db in the current
    folder), which MLflow would create: it must say there is none, and name the store of a parent folder."""
    (tmp_path / "mlflow.db").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    code = ("import vaeflow\ntry:\n    vaeflow.load_model('models:/nope@champion')\n"
            "except vaeflow.core.errors.CheckpointError as exc:\n    print(exc)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VAEFLOW_HOME")}
    out = subprocess.run([sys.executable, "-c", "import vaeflow.core.errors\n" + code], cwd=tmp_path / "sub",
                         env=env, capture_output=True, text=True, check=True).stdout
    assert f"there is no MLflow store at sqlite:///{tmp_path / 'sub' / 'mlflow.db'}" in out, out
    assert f"set MLFLOW_TRACKING_URI=sqlite:///{tmp_path / 'mlflow.db'}" in out
    assert list((tmp_path / "sub").iterdir()) == []


def test_get_client_creates_the_store_for_a_run_but_not_for_a_lookup(tmp_path, monkeypatch):
    from vaeflow.pipelines.tracking import get_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VAEFLOW_HOME", str(tmp_path))
    with pytest.raises(VaeflowError, match="no MLflow store"):
        get_client(create=False)
    assert not (tmp_path / "mlflow.db").exists()
    get_client()  # a run makes it
    assert (tmp_path / "mlflow.db").is_file()
    assert get_client(create=False).search_registered_models() == []


# --- every dataset's manifest covers its source files' contents ------------------------------------------------
def test_manifest_covers_every_image_and_a_same_size_same_mtime_edit(tmp_path):
    from vaeflow.core.interfaces import file_sha256
    from vaeflow.core.manifest import prepare, source_files

    files = make_images(tmp_path / "images" / "a", 6) + make_images(tmp_path / "images" / "b", 6)
    cfg = load_config(TINY, folder_sets(tmp_path / "images"))
    manifest, _ = prepare(cfg, tmp_path / "prepared")
    by_name = {f["name"]: f for f in manifest["files"]}
    assert sorted(by_name) == sorted(f"{f.parent.name}/{f.name}" for f in files)  # same base names stay apart
    assert all(by_name[f"{f.parent.name}/{f.name}"]["sha256"] == file_sha256(f) for f in files)
    # an edit that keeps the size and puts the mtime back: the same process must still see it
    target = files[3]
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0x01  # inside the image data: a different file, same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    changed = {f["name"]: f["sha256"] for f in source_files(cfg)}
    assert changed[f"a/{target.name}"] == file_sha256(target) != by_name[f"a/{target.name}"]["sha256"]


def test_replacing_images_reruns_prepare_data_and_train(home, tmp_path):
    from vaeflow.core.manifest import MANIFEST_FILE, load_prepared
    from vaeflow.pipelines.pipeline import run_pipeline

    files = make_images(tmp_path / "images", 16)
    sets = folder_sets(tmp_path / "images", "tracking.model_name=stale-data")
    first = run_pipeline(str(TINY), sets, until="train")
    assert first["stages"] == {"prepare_data": "ran", "train": "ran"}, first["stages"]
    again = run_pipeline(str(TINY), sets, until="train")
    assert again["stages"] == {"prepare_data": "cached", "train": "cached"}
    for i, f in enumerate(files[::2]):  # replace half the images by others of the same size
        Image.new("L", (12, 12), 250 - 9 * i).save(f)
    third = run_pipeline(str(TINY), sets, until="train")
    assert third["stages"] == {"prepare_data": "ran", "train": "ran"}, third["stages"]
    assert third["data"]["manifest_hash"] != first["data"]["manifest_hash"] and third["run_dir"] != first["run_dir"]
    manifest = json.loads((Path(third["data"]["folder"]) / MANIFEST_FILE).read_text())
    assert len(manifest["files"]) == 16
    new_pixels = torch.cat(list(load_prepared(third["data"]["folder"]).values()))  # (16, 1, 16, 16) uint8
    assert sorted(new_pixels[:, 0, 8, 8].tolist()) == sorted(
        int(np.array(Image.open(f))[6, 6]) for f in files)  # the prepared data holds the new images


def test_registered_artifacts_are_readable_by_the_stores_other_users(home, tmp_path, monkeypatch):
    from vaeflow.pipelines.pipeline import run_pipeline

    store = tmp_path / "shared-store"
    monkeypatch.setenv("VAEFLOW_HOME", str(store))
    old = os.umask(0o022)
    try:
        result = run_pipeline(str(TINY), ["data.dataset.n_train=256", "data.dataset.n_test=64", "train.epochs=1",
                                          "eval.iwae_k=4", "train.progress=false", "tracking.model_name=shared"])
    finally:
        os.umask(old)
    assert result["model"]["version"] == 1
    files = [p for p in (store / "mlartifacts").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.yaml", "plugins.json", "manifest.json"} <= names, names
    modes = {str(p.relative_to(store)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in (store / "mlartifacts").rglob("*") if p.is_dir()}
    assert folders == {"0o755"}, folders


NO_SOURCES = '''
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Dataset, Options


class NpyPair(Dataset):
    """A third-party dataset that reads train.npy and test.npy under a folder and lists no sources()."""

    name = "npy-pair"

    class Options(Options):
        folder: str = Field(description="holds train.npy and test.npy, uint8 (N, 8, 8)")

    @property
    def shape(self):
        return (1, 8, 8)

    def tensors(self, split):
        return torch.from_numpy(np.load(Path(self.options.folder) / f"{split}.npy"))[:, None]  # (N, 1, 8, 8)


@hookimpl
def register_datasets(register):
    register(NpyPair)
'''


def test_a_dataset_that_names_no_files_is_keyed_by_its_content(tmp_path, local_plugins):
    """A third-party dataset without sources(): the data cache key and the manifest follow what it loads, so an
    edited file (same size, same mtime) re-runs prepare_data; a GENERATED dataset is keyed by its options alone."""
    from vaeflow.core.manifest import content_identity, prepare, tensor_sha256

    registry = local_plugins({"npy_pair": NO_SOURCES})
    folder = tmp_path / "npy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("test", 8)):
        np.save(folder / f"{split}.npy", rng.integers(0, 256, (n, 8, 8), dtype=np.uint8))
    cfg = load_config(TINY, ["data.dataset={name: npy-pair, folder: " + str(folder) + "}"])
    before = content_identity(cfg, registry)
    train = torch.from_numpy(np.load(folder / "train.npy"))[:, None]  # (32, 1, 8, 8)
    assert before[0] == f"train:{tensor_sha256(train)}"  # an independent hash of what the file holds
    manifest, first = prepare(cfg, tmp_path / "prepared", registry)
    assert manifest["files"] == [] and manifest["splits"]["train"]["sha256"] == tensor_sha256(train)

    target = folder / "train.npy"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # the last pixel: same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = content_identity(cfg, registry)
    assert after[0] != before[0] and after[1] == before[1]  # the test split did not change
    manifest2, second = prepare(cfg, tmp_path / "prepared", registry)
    assert second != first and manifest2["manifest_hash"] != manifest["manifest_hash"]

    shapes = load_config(TINY)
    assert content_identity(shapes) == []  # shapes is GENERATED: its options and code are its identity
