"""Where each weight file comes from: its URL, name and checksum, as data (``RemoteFile``,
``WeightSources``), and the errors and report of a fetch."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from models.checkpoints import (
    MMAGIC_URL,
    OFFICIAL_ZIP_DRIVE_ID,
)
from models.detector import DETECTOR_WEIGHTS
from models.registry import MODELS

log = logging.getLogger(__name__)

Variant = Literal["official", "mmagic"]
DetectorChoice = Literal["v1", "v2", "none"]

DRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"
OFFICIAL_ZIP_NAME = "checkpoints.zip"  # the name the authors' download script gives the zip
BASE_URL_ENV = "COLORIZE_WEIGHTS_BASE_URL"
USER_AGENT = "instcolor-service fetch-weights"
CHUNK = 1 << 20
MAX_CONFIRM_PAGES = 4
MAX_PAGE_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or produced an unusable file; nothing was left at the destination."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the checksum the file name promises."""


class UnreachableError(DownloadError):
    """The host could not be reached or the connection failed (offline, DNS, firewall, HTTP error)."""


@dataclass(frozen=True)
class RemoteFile:
    """Where a file comes from, the name it is stored under and its sha256 prefix when known."""

    url: str
    filename: str
    sha256_prefix: str | None = None

    def matches(self, digest: str) -> bool:
        return self.sha256_prefix is None or digest.startswith(self.sha256_prefix.lower())


def _name_hash(filename: str) -> str | None:
    """``name-<hex>.pth`` -> ``<hex>``: the sha256-prefix naming of torchvision and OpenMMLab."""
    found = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", filename)
    return found.group(1) if found else None


def remote_file(url: str) -> RemoteFile:
    """A file named by its URL; a ``-<hex>`` suffix in the name is its sha256 prefix."""
    filename = url.rsplit("/", 1)[-1]
    return RemoteFile(url, filename, _name_hash(filename))


def model_files() -> dict[str, tuple[RemoteFile, ...]]:
    """Each registry model's directly downloadable files, checked against their full sha256.

    InstColorization is left out: its files come in the official zip (``official_zip``). A file
    converted from another framework (Larsson ECCV16) is listed as its source, the file fetched.
    """
    return {
        spec.name: tuple(
            RemoteFile(w.url, w.filename, w.sha256_prefix)
            if w.converted_from is None
            else RemoteFile(w.converted_from.url, w.converted_from.filename, None)
            for w in spec.weights
            if w.packed_in is None
        )
        for spec in MODELS.values()
        if all(w.packed_in is None for w in spec.weights) and not spec.trained_here
    }


@dataclass(frozen=True)
class WeightSources:
    """Where each weight file is downloaded from (replace it for mirrors and tests)."""

    official_zip: RemoteFile
    mmagic: RemoteFile
    detectors: Mapping[str, RemoteFile] = field(default_factory=dict)
    lpips_vgg16: RemoteFile | None = None
    # The other models' files by model name (models/registry.py), for ``fetch-weights --model``;
    # listed here only: fetch-weights does not download them yet.
    models: Mapping[str, tuple[RemoteFile, ...]] = field(default_factory=dict)

    @classmethod
    def default(cls) -> WeightSources:
        from torchvision.models import VGG16_Weights

        return cls(
            official_zip=RemoteFile(DRIVE_URL.format(id=OFFICIAL_ZIP_DRIVE_ID), OFFICIAL_ZIP_NAME),
            mmagic=remote_file(MMAGIC_URL),
            detectors={
                v: RemoteFile(w.url, w.filename, w.sha256_prefix)
                for v, w in DETECTOR_WEIGHTS.items()
            },
            lpips_vgg16=remote_file(VGG16_Weights.IMAGENET1K_V1.url),
            models=model_files(),
        )

    @classmethod
    def mirror(cls, base_url: str) -> WeightSources:
        """Every file under ``base_url`` by its usual name (the zip as ``checkpoints.zip``)."""
        base = base_url.rstrip("/") + "/"

        def moved(remote: RemoteFile) -> RemoteFile:
            return replace(remote, url=base + remote.filename)

        default = cls.default()
        return cls(
            official_zip=RemoteFile(base + OFFICIAL_ZIP_NAME, OFFICIAL_ZIP_NAME),
            mmagic=moved(default.mmagic),
            detectors={v: moved(f) for v, f in default.detectors.items()},
            lpips_vgg16=moved(default.lpips_vgg16) if default.lpips_vgg16 else None,
            models={m: tuple(moved(f) for f in files) for m, files in default.models.items()},
        )

    @classmethod
    def from_environment(cls, base_url: str | None = None) -> WeightSources:
        """``base_url`` (``--base-url``), else ``COLORIZE_WEIGHTS_BASE_URL``, else the originals."""
        chosen = base_url or os.environ.get(BASE_URL_ENV)
        return cls.mirror(chosen) if chosen else cls.default()


@dataclass(frozen=True)
class FetchedFile:
    path: Path
    sha256: str
    downloaded: bool  # False: it was already there and verified


@dataclass
class FetchReport:
    files: list[FetchedFile] = field(default_factory=list)
    checkpoints: Path | None = None  # what COLORIZE_CHECKPOINTS should point at
    detector_weights: Path | None = None  # what COLORIZE_DETECTOR_WEIGHTS should point at
    lpips_vgg16: Path | None = None  # what evaluate --lpips-weights should point at
