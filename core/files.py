"""Atomic file writes (a temp file in the same folder, fsync, rename): readers never see a half-written file. Imports
nothing heavy, so the CLI's light paths can use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (0644 under umask 022), so that a shared
        # store's other users can read it. The umask is read from /proc (os.umask would set it, racing other threads)
        try:
            umask = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                             if line.startswith("Umask:")).split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):  # not Linux (or a kernel before 4.7)
            umask = os.umask(0o077)
            os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
