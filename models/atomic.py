"""Atomic file writes: a temporary file beside the destination, fsync, then ``os.replace``.

A reader (or a resumed run) sees either the old file or the complete new one, never half of it;
an interrupted or failed write leaves no temporary file behind. Standard library only, so the
API process, the weights download and the CLI use it without importing torch.

- ``write_atomic(path, write)``: ``write(handle)`` fills the file in one go;
- ``atomic_path(path)``: a context manager yielding the temporary path for writers that stream or
  that must check the content before it replaces anything (a download renamed only after its
  checksum passes): raise inside the block and nothing is renamed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temp_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name in ``path``'s folder (same file system, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is synced and renamed over
    ``path``, on an exception it is removed and ``path`` is left as it was.

    The caller creates the file (``temp.open("xb")``); the folder is created here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(path, suffix)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(handle)`` on a new temporary file and rename it over ``path`` once complete."""
    with atomic_path(path) as temp, temp.open("xb") as handle:
        write(handle)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    """UTF-8, newlines as given (no translation: CSV text keeps its ``\\r\\n``)."""
    write_bytes_atomic(path, text.encode("utf-8"))
