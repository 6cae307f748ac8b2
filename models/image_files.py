"""Which files are images: the extensions a folder scan picks up, and the scan itself.

Shared by ``colorize`` (inputs to colorize), ``evaluate`` and ``prepare-data`` (colour photos as
ground truth). A file named on the command line is always tried, whatever its extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Extensions (case-insensitive) of the images a folder scan picks up for colorization."""

PHOTO_EXTENSIONS = IMAGE_EXTENSIONS - {".gif"}
"""For ground truth (training, evaluation): a GIF's 256-colour palette is no colour reference."""


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def scan_images(
    folder: Path, extensions: frozenset[str] = IMAGE_EXTENSIONS, skip: Path | None = None
) -> Iterator[Path]:
    """Files below ``folder`` with one of ``extensions``, in a stable (sorted) order.

    Hidden files and folders are left out, and so is the resolved folder ``skip`` (an output
    folder inside the input) with everything in it.
    """
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and (skip is None or not _is_within((here / d).resolve(), skip))
        )
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                yield here / name
