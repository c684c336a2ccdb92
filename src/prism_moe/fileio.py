"""Durable file writes: a reader sees the old file or the whole new one, never a torn one.

Every file prism-moe writes for later reading (placements, run state, traces, keys) goes through
`atomic_write_bytes`: the bytes go to a temporary file in the same folder, are fsynced, and the temporary
file is renamed over the target (atomic on POSIX), then the folder is fsynced so the rename survives a
crash. A crash at any point leaves either the old file or the new one, plus at most a stray `.*.tmp`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename, fsync the folder).

    `mode` sets the file's permissions before any byte is written (e.g. 0o600 for secrets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)
