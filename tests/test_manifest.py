"""The data manifest and prepared-tensor cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from vaeflow.core.config import load_config
from vaeflow.core.data import load_split
from vaeflow.core.errors import DataError
from vaeflow.core.interfaces import file_sha256
from vaeflow.core.manifest import MANIFEST_FILE, TENSORS_FILE, load_prepared, prepare

from conftest import TINY

FASHION = Path("/usr/share/datasets/fashion-mnist")


def tiny(*sets):
    return load_config(TINY, ["data.dataset.n_train=256", "data.dataset.n_test=32", *sets])


def test_manifest_describes_the_prepared_splits(tmp_path):
    cfg = tiny("data.pad_to=36")
    manifest, folder = prepare(cfg, tmp_path)
    assert folder.name == manifest["manifest_hash"] and len(manifest["manifest_hash"]) == 64
    train = manifest["splits"]["train"]
    assert {k: train[k] for k in ("n", "shape", "dtype")} == {"n": 256, "shape": [1, 36, 36], "dtype": "float32"}
    assert manifest["preprocessing"]["pad_to"] == 36
    assert manifest["files"] == []  # generated data has no source files
    assert manifest["prepared_sha256"] == file_sha256(folder / TENSORS_FILE)
    splits = load_prepared(folder)
    assert torch.equal(splits["test"], load_split(cfg, "test"))  # same pixels as the in-memory path
    # each split's content hash: sha256 of dtype, shape and bytes, recomputed here from what was stored
    digest = hashlib.sha256(b"torch.float32(256, 1, 36, 36)" + splits["train"].numpy().tobytes())
    assert train["sha256"] == digest.hexdigest()


def test_prepare_reuses_a_valid_cache_and_rebuilds_a_corrupt_one(tmp_path):
    cfg = tiny()
    manifest, folder = prepare(cfg, tmp_path)
    stamp = (folder / TENSORS_FILE).stat().st_mtime_ns
    again, _ = prepare(cfg, tmp_path)
    assert again["manifest_hash"] == manifest["manifest_hash"]
    assert (folder / TENSORS_FILE).stat().st_mtime_ns == stamp  # reused, not rewritten
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor payload
    (folder / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_prepared(folder)
    prepare(cfg, tmp_path)
    assert load_prepared(folder)["train"].shape == (256, 1, 32, 32)  # rebuilt


def test_different_data_options_give_different_manifests(tmp_path):
    a, _ = prepare(tiny(), tmp_path)
    b, _ = prepare(tiny("data.dataset.seed=1"), tmp_path)
    c, _ = prepare(tiny("train.lr=0.5"), tmp_path)  # not a data option
    assert a["manifest_hash"] != b["manifest_hash"]
    assert a["manifest_hash"] == c["manifest_hash"]


def test_missing_prepared_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no prepared data"):
        load_prepared(tmp_path / "nope")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_manifest_lists_sources_and_detects_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("VAEFLOW_DATA_DIR", str(tmp_path / "cache"))
    cfg = load_config(TINY, ["data.dataset={name: fashion-mnist}", "data.pad_to=32"])
    manifest, _ = prepare(cfg, tmp_path / "prepared")
    names = sorted(f["name"] for f in manifest["files"])
    assert names == sorted(p.name for p in FASHION.glob("*.gz"))
    by_name = {f["name"]: f for f in manifest["files"]}
    assert by_name["t10k-labels-idx1-ubyte.gz"]["sha256"] == file_sha256(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert manifest["splits"]["train"]["n"] == 60000 and manifest["splits"]["test"]["shape"] == [1, 32, 32]
    # a source with valid IDX structure but altered pixels is caught by the content checksum
    root = tmp_path / "root"
    root.mkdir()
    for f in FASHION.glob("*.gz"):
        shutil.copy(f, root / f.name)
    import gzip

    raw = bytearray(gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes()))
    raw[5000] ^= 0x01
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    (root / "t10k-images-idx3-ubyte").write_bytes(bytes(raw))
    monkeypatch.setenv("VAEFLOW_DATA_DIR", str(tmp_path / "cache2"))
    bad = load_config(TINY, [f"data.dataset={{name: fashion-mnist, root: {root}}}"])
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare(bad, tmp_path / "prepared2")
    json.dumps(manifest)  # the manifest is plain JSON
