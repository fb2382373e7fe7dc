"""Atomic file writes (a temp file in the same folder, fsync, rename): readers never see a half-written file; output
paths checked before any work; a full disk reported as a user error. Imports nothing heavy, so the CLI's light paths
can use it."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from vaeflow.core.errors import VaeflowError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on device; disk quota exceeded
NEARLY_FULL = 64 * 1024  # bytes: a write that failed with less free than this failed for want of space


class DiskFullError(VaeflowError, OSError):
    """The disk (or quota) holding an output ran out of space; still an OSError (errno ENOSPC) for callers that
    treat any failed write alike."""

    def __init__(self, message: str):
        VaeflowError.__init__(self, message)
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0])


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: str | Path) -> int | None:
    """Bytes an unprivileged writer may still use in the file system of `folder` (None when it cannot be told)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(path: str | Path, needed: int | None = None) -> DiskFullError:
    """The error for a write of `path` that the disk had no room for: the path, the space needed, the space free."""
    path = Path(path)
    free = free_bytes(path.parent if not path.is_dir() else path)
    need = f"it needs about {human_bytes(needed)}" if needed else "it needs more room"
    have = f", and {human_bytes(free)} is free there" if free is not None else ""
    return DiskFullError(f"no space left on device: cannot write {path} ({need}{have}). Free some space (or "
                         f"choose another output folder) and run again; a training continues from its last "
                         f"checkpoint with `vaeflow train --resume RUN_DIR`")


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or (for writers such as torch.save that report a
    short write in their own words) hardly any space left where it wrote."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
        return True
    if isinstance(exc, Exception) and not isinstance(exc, (OSError, VaeflowError)):
        free = free_bytes(folder)
        return free is not None and free < NEARLY_FULL
    return False


def current_umask() -> int:
    """This process's umask, read from /proc (os.umask would set it, racing other threads), else set and restored."""
    try:
        return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                        if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):  # not Linux (or a kernel before 4.7)
        umask = os.umask(0o077)
        os.umask(umask)
        return umask


def atomic_write(path: str | Path, write, size: int | None = None) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see a half-written file.

    `size` (bytes, when known) is checked against the free space first; a write that runs out of space leaves no
    temp file and raises DiskFullError naming the path and the space needed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise disk_full(path, size) from None
        raise
    free = free_bytes(path.parent)
    if size is not None and free is not None and free < size:
        raise disk_full(path, size)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise disk_full(path, size) from None
        raise
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0644 under umask 022), so that a shared
        # store's other users can read it
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    except BaseException as exc:
        full = is_disk_full(exc, path.parent)  # measured before the temp file's space is given back
        Path(tmp).unlink(missing_ok=True)
        if not full:
            raise
    # raised here, not in the except block: the writer's error (whose frames may hold the temp file open, and so
    # its space taken) is not kept alive as this one's context
    raise disk_full(path, size)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    data = text.encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), size=len(data))


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a text file (e.g. a JSONL log); a full disk is a DiskFullError naming the file."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        with open(path, "ab") as fh:
            fh.write(data)
    except OSError as exc:
        if exc.errno in FULL_ERRNOS:
            raise disk_full(path, len(data)) from None
        raise


def check_writable(path: str | Path, folder: bool = False, option: str = "--out") -> Path:
    """`path` if it can be written (a file, or with folder=True a folder to create or fill), else a VaeflowError
    that names it and says why: a folder where a file goes (or the reverse), no such folder and none can be made,
    not writable. Called before any work, so that nothing is computed and then lost.

    Writability is tried, not guessed from mode bits (root passes every permission check yet cannot write to a
    read-only mount or to /proc): a temp file is created and removed in the nearest folder that exists."""
    path = Path(path)
    what = f"{option} {path}" if option else str(path)
    if path.exists():
        if folder and not path.is_dir():
            raise VaeflowError(f"{what} is a file, not a folder; pass a folder to write into (created when missing)")
        if not folder and path.is_dir():
            raise VaeflowError(f"{what} is a folder; pass a file name (a file inside it, say)")
    target = path if (folder and path.is_dir()) else path.parent
    nearest = target
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if not nearest.is_dir():
        raise VaeflowError(f"cannot write {what}: {nearest} is a file, so no folder can be made under it; pass a path "
                           f"in a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".vaeflow-write-check.", dir=nearest)
    except OSError as exc:
        raise VaeflowError(f"cannot write {what}: {_why(exc, nearest, target)}; pass a path in a folder you can "
                           f"write to") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _why(exc: OSError, nearest: Path, target: Path) -> str:
    missing = "" if nearest == target else f"no such folder {target}, and "
    if exc.errno == errno.EROFS:
        return f"{missing}{nearest} is on a read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{missing}{nearest} is not writable (permission denied)"
    if exc.errno in FULL_ERRNOS:
        return f"{missing}no space left on device in {nearest}"
    if missing:
        return f"{missing}none can be made in {nearest} ({exc.strerror})"
    return f"{nearest} does not take new files ({exc.strerror})"


def read_record(path: str | Path, schema, advice: str):
    """`path`'s JSON validated by `schema` (a pydantic model or TypeAdapter); bad JSON, a missing key or a wrong type
    is a CheckpointError naming the file, the place in it and `advice` (how to get a good copy)."""
    from pydantic import TypeAdapter, ValidationError

    from vaeflow.core.errors import CheckpointError

    adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
    try:
        return adapter.validate_json(Path(path).read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise CheckpointError(f"{path} is corrupt ({where + ': ' if where else ''}{err['msg']}); {advice}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; {advice}") from None
