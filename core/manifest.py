"""The data manifest and the prepared-tensor cache behind the pipeline's prepare_data stage.

A manifest lists the source files (every file the dataset reads, each image of an image folder included) with
their sha256, each split's size, shape and content sha256, and the preprocessing applied. Its hash keys a folder
holding the prepared splits as one safetensors file, which training loads directly; the file's own sha256 is checked
on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import safetensors.torch
import torch

from vaeflow.core.checkpoint import atomic_write, write_text
from vaeflow.core.config import Config, canonical_json
from vaeflow.core.data import open_dataset, pad
from vaeflow.core.errors import DataError
from vaeflow.core.interfaces import Dataset, digest_tensor, file_sha256
from vaeflow.core.registry import Registry

MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "splits.safetensors"
log = logging.getLogger("vaeflow.data")


def _manifest_hash(manifest: dict) -> str:
    """sha256 over everything but local paths and the hash itself."""
    portable = {k: v for k, v in manifest.items() if k not in ("manifest_hash", "prepared_sha256")}
    portable["files"] = [{k: v for k, v in f.items() if k != "path"} for f in manifest["files"]]
    return hashlib.sha256(canonical_json(portable).encode()).hexdigest()


# (path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256, for this process. The kernel sets ctime on
# every write and rename, and no user call (touch, os.utime) can set it back, so an edit that keeps the size and
# restores the mtime still misses; a file replaced by another (cp + mv) has another inode.
_SHA256: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    """What a file's content hash is memoised under: it changes whenever the content can have changed."""
    st = path.stat()
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_sha256(path: Path) -> str:
    """sha256 of a file's content, hashed again only when its inode, size, mtime or ctime changed."""
    key = _stat_key(path)
    if key not in _SHA256:
        digest = file_sha256(path)
        if _stat_key(path) == key:  # not written to while it was read
            _SHA256[key] = digest
        return digest
    return _SHA256[key]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest_tensor(digest, tensor)
    return digest.hexdigest()


def source_files(cfg: Config, registry: Registry | None = None, dataset: Dataset | None = None) -> list[dict]:
    """[{name, path, bytes, sha256}] of the files the dataset reads (empty for generated data); a name is the path
    relative to the folder holding them all, so two files with the same base name stay apart."""
    dataset = dataset if dataset is not None else open_dataset(cfg, registry)
    paths = [Path(p) for p in dataset.sources()]
    base = Path(os.path.commonpath([p.absolute() for p in paths])) if len(paths) > 1 else None
    rows = []
    for p in paths:
        name = p.absolute().relative_to(base).as_posix() if base is not None else p.name
        rows.append({"name": name, "path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": content_sha256(p)})
    return rows


def content_identity(cfg: Config, registry: Registry | None = None) -> list[str]:
    """What identifies the data beyond its options and code, for cache keys: the sha256 of each source file (fast
    path by stat); nothing for a GENERATED dataset; and for a dataset that lists no files, the sha256 of each loaded
    split, since what it reads is unknown (a changed file must still be caught)."""
    ds = open_dataset(cfg, registry)
    files = source_files(cfg, registry, ds)
    if files or ds.GENERATED:
        return [f["sha256"] for f in files]
    log.info("dataset %r lists no source files (sources()) and is not GENERATED: its splits are loaded and hashed "
             "to check the data cache", cfg.data.dataset.name)
    return [f"{split}:{tensor_sha256(ds.tensors(split))}" for split in ds.SPLITS]


def prepare(cfg: Config, cache_dir: str | Path, registry: Registry | None = None) -> tuple[dict, Path]:
    """Load, preprocess and cache every split; returns (manifest, prepared folder). Reuses a valid cache."""
    ds = open_dataset(cfg, registry)
    files = source_files(cfg, registry, ds)
    splits, tensors = {}, {}
    for split in ds.SPLITS:
        images = pad(ds.tensors(split), cfg.data.pad_to)  # (N, C, H, W), uint8 or float
        tensors[split] = images.contiguous()
        splits[split] = {"n": len(images), "shape": list(images.shape[1:]),
                         "dtype": str(images.dtype).removeprefix("torch."),
                         "sha256": tensor_sha256(images)}  # the content: a cache folder never holds other data
    manifest = {
        "version": 2,  # 2: each split carries its content sha256
        "dataset": cfg.data.dataset.model_dump(mode="json"),
        "files": files,
        "splits": splits,
        "preprocessing": {
            "pad_to": cfg.data.pad_to,
            "stored_as": "as the dataset yields it (uint8 0..255 or float 0..1)",
            "at_load": "uint8 / 255 -> float32 in [0, 1]",
        },
    }
    manifest["manifest_hash"] = _manifest_hash(manifest)
    folder = Path(cache_dir) / manifest["manifest_hash"]
    try:
        load_prepared(folder)  # a complete, uncorrupted cache from an earlier run
        return json.loads((folder / MANIFEST_FILE).read_text()), folder
    except DataError:
        pass
    atomic_write(folder / TENSORS_FILE, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    manifest["prepared_sha256"] = file_sha256(folder / TENSORS_FILE)
    write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2))  # written last: marks the folder complete
    return manifest, folder


def load_prepared(folder: str | Path) -> dict[str, torch.Tensor]:
    """The prepared splits {split: (N, C, H, W)} of a cache folder, after checking its sha256."""
    folder = Path(folder)
    mpath, tpath = folder / MANIFEST_FILE, folder / TENSORS_FILE
    if not mpath.is_file() or not tpath.is_file():
        raise DataError(f"{folder} holds no prepared data (missing {MANIFEST_FILE} or {TENSORS_FILE}); run prepare_data")
    manifest = json.loads(mpath.read_text())
    got = file_sha256(tpath)
    if got != manifest.get("prepared_sha256"):
        raise DataError(f"{tpath}: checksum mismatch (sha256 {got[:16]}..., manifest says "
                        f"{str(manifest.get('prepared_sha256'))[:16]}...); the cache is corrupt: delete {folder}")
    return safetensors.torch.load_file(tpath)
