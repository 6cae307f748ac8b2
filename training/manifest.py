"""The training manifest: ``DATA_DIR/manifest.jsonl``, one JSON object per usable image.

Each row: ``root`` (the input folder, absolute), ``path`` (the file relative to it, posix),
``width`` and ``height`` (after EXIF orientation, the frame the boxes are in), ``boxes``
(``[[x1, y1, x2, y2], ...]`` float pixels, at most 8, highest score first, all at or above the
threshold), ``scores``, ``split`` (``train`` or ``val``) and ``labels`` (the detector's COCO class of
each box; empty in manifests written before it was recorded). Near-grey images are not rows; they
are listed in ``DATA_DIR/skipped.jsonl`` so a resumed run does not look at them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from models.image_files import PHOTO_EXTENSIONS, scan_images

MANIFEST_NAME = "manifest.jsonl"
SKIPPED_NAME = "skipped.jsonl"

Split = Literal["train", "val"]


@dataclass(frozen=True)
class ManifestRow:
    root: str
    path: str
    width: int
    height: int
    boxes: list[list[float]]
    scores: list[float]
    split: Split
    labels: list[int] = field(default_factory=list)  # detector class per box (li-dcnn labels)

    @property
    def file(self) -> Path:
        return Path(self.root) / self.path

    @property
    def key(self) -> tuple[str, str]:
        return self.root, self.path


@dataclass(frozen=True)
class SourceFile:
    """A file to prepare: its input root and its path relative to it."""

    root: Path
    relative: str

    @property
    def file(self) -> Path:
        return self.root / self.relative

    @property
    def key(self) -> tuple[str, str]:
        return str(self.root), self.relative


def scan_inputs(inputs: Sequence[Path]) -> list[SourceFile]:
    """Files and folders -> image files (folders recursively, hidden entries left out), sorted."""
    found: list[SourceFile] = []
    seen: set[Path] = set()
    for given in inputs:
        if given.is_dir():
            root = given.resolve()
            for path in scan_images(root, PHOTO_EXTENSIONS):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    found.append(SourceFile(root, path.relative_to(root).as_posix()))
        elif given.is_file():
            path = given.resolve()
            if path not in seen:
                seen.add(path)
                found.append(SourceFile(path.parent, path.name))
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    return found


def split_of(relative: str, val_fraction: float, seed: int) -> Split:
    """A stable split from a hash of the path: the same image keeps its split across re-runs."""
    digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete JSON lines of ``path``; a torn last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            yield json.loads(line)


def repair_jsonl(path: Path) -> None:
    """Cut a torn last line so appending continues on a line boundary."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as handle:
            handle.truncate(cut)


def read_manifest(data_dir: Path) -> list[ManifestRow]:
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no manifest; run `python -m service prepare-data PHOTOS --output {data_dir}`"
        )
    return [ManifestRow(**row) for row in _read_jsonl(path)]


def read_skipped(data_dir: Path) -> list[dict[str, Any]]:
    return list(_read_jsonl(data_dir / SKIPPED_NAME))


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so a crash loses at most the batch being written."""
    with path.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def row_dict(row: ManifestRow) -> dict[str, Any]:
    return asdict(row)
