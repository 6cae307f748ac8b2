"""The models the product knows, as data: names, weight files, input, decoding and a loader.

Each entry is a frozen :class:`ModelSpec`. A model's weights live at
``<weights dir>/<spec.folder>/<official file name>`` (``spec.folder`` is the model's name, except
for InstColorization, whose files stay where ``fetch-weights`` has always put them). Adding a model
is one module in ``models/`` (network, strict loader, ``predict_ab``) plus one entry in ``MODELS``.

Models without the detector (the Zhang networks and Larsson ECCV16) are
:class:`AutomaticColorizer`: a batched ``predict_ab`` from Lab L at the network's input size to Lab
ab at the same size; the product's own Lab merge takes it to the original resolution.
InstColorization's loader returns its three networks (``ColorizationNetworks``), which the
pipeline combines with the detector.

Nothing here downloads anything; ``service/weights/sources.py`` derives its download list from the
``WeightFile`` entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from models.checkpoints import (
    NETWORK_FILES,
    OFFICIAL_VARIANT,
    OFFICIAL_ZIP_DRIVE_ID,
    ColorizationNetworks,
    load_networks,
    sha256_file,
)
from models.larsson_eccv16 import FILENAME as LARSSON_FILENAME
from models.larsson_eccv16 import INPUT_SIZE as LARSSON_INPUT_SIZE
from models.larsson_eccv16 import SOURCE_FILENAME as LARSSON_SOURCE_FILENAME
from models.larsson_eccv16 import SOURCE_SIZE as LARSSON_SOURCE_SIZE
from models.larsson_eccv16 import SOURCE_URL as LARSSON_SOURCE_URL
from models.larsson_eccv16 import convert_caffe_hdf5, load_larsson_eccv16
from models.li_dcnn import FILENAME as LI_FILENAME
from models.li_dcnn import INPUT_SIZE as LI_INPUT_SIZE
from models.li_dcnn import load_li_dcnn
from models.zhang_eccv16 import FILENAME as ECCV16_FILENAME
from models.zhang_eccv16 import INPUT_SIZE as ECCV16_INPUT_SIZE
from models.zhang_eccv16 import load_zhang_eccv16
from models.zhang_siggraph17 import FILENAME as SIGGRAPH17_FILENAME
from models.zhang_siggraph17 import INPUT_SIZE as SIGGRAPH17_INPUT_SIZE
from models.zhang_siggraph17 import load_zhang_siggraph17
from models.zhao_pixelated import FILENAME as ZHAO_FILENAME
from models.zhao_pixelated import INPUT_SIZE as ZHAO_INPUT_SIZE
from models.zhao_pixelated import MAX_SAMPLES as ZHAO_MAX_SAMPLES
from models.zhao_pixelated import load_zhao_pixelated

log = logging.getLogger(__name__)

DEFAULT_MODEL = "instcolor"
ZHANG_BASE_URL = "https://colorizers.s3.us-east-2.amazonaws.com/"

MapLocation = str | torch.device
M = TypeVar("M", covariant=True)


@runtime_checkable
class AutomaticColorizer(Protocol):
    """A model that maps (N, 1, H, W) Lab L to (N, 2, H, W) Lab ab with no boxes and no hints."""

    input_size: int

    def predict_ab(self, lightness: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class WeightFile:
    """One file a model loads: its official name, where it is published, and what is known of it.

    ``sha256`` is the full digest when published (or measured on the official file); ``sha256``
    ``None`` with a ``-<hex>`` suffix in the name still gives the torch ``check_hash`` prefix.
    ``packed_in`` names the archive the file comes in (InstColorization's zip); ``converted_from``
    is for weights that only exist in another framework (Larsson ECCV16's Caffe HDF5 file): the
    product converts that source with ``convert`` (source, destination -> sha256) and stores the
    result under ``filename``.
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    packed_in: str | None = None
    converted_from: WeightFile | None = None
    convert: Callable[[Path, Path], str] | None = None

    @property
    def sha256_prefix(self) -> str | None:
        """The full sha256 if known, else the hex suffix of the name (``name-<hex>.pth``)."""
        if self.sha256 is not None:
            return self.sha256
        stem = self.filename.rsplit(".", 1)[0]
        tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
        is_hex = 8 <= len(tail) <= 64 and all(c in "0123456789abcdef" for c in tail)
        return tail if is_hex else None


@dataclass(frozen=True)
class ModelSpec(Generic[M]):
    """One servable model: what it is, its files, its input and decoding, and how to load it."""

    name: str
    title: str
    paper: str
    weights: tuple[WeightFile, ...]
    input_size: int
    uses_detector: bool
    preprocessing: str
    decoding: str
    loader: Callable[[Path, MapLocation], M]  # the model's folder -> the loaded model
    folder_name: str | None = None  # under the weights dir; default: the model's name
    # For a model whose release takes a processing size (Larsson's ``--size``): the loader at
    # another network size, (folder, map location, size) -> model; None: fixed size.
    sized_loader: Callable[[Path, MapLocation, int], M] | None = None

    published: bool = True  # False: no official weights exist; `train --model NAME` makes them
    max_samples: int = 1  # > 1: a sampling model (samples=N colourings per image, seed)
    takes_hints: bool = False  # follows colour hints (models.hints): zhang-siggraph17

    def folder(self, weights_dir: Path | str) -> Path:
        return Path(weights_dir) / (self.folder_name or self.name)

    def weight_paths(self, weights_dir: Path | str) -> tuple[Path, ...]:
        folder = self.folder(weights_dir)
        return tuple(folder / w.filename for w in self.weights)

    def missing_files(self, weights_dir: Path | str) -> list[Path]:
        return [p for p in self.weight_paths(weights_dir) if not p.is_file()]

    def load(
        self,
        weights_dir: Path | str,
        map_location: MapLocation = "cpu",
        network_size: int | None = None,
    ) -> M:
        """Load strictly from ``<weights_dir>/<folder>``; a non-official file is logged, not refused.

        ``network_size`` (only for a model with ``sized_loader``) runs the same weights at another
        processing size, as the release's own size option does; None: the release's default.
        """
        if network_size is not None and self.sized_loader is None:
            raise ValueError(f"model {self.name!r} runs at one size only; no network size to set")
        for weight, path in zip(self.weights, self.weight_paths(weights_dir), strict=True):
            if weight.sha256 is not None and path.is_file() and sha256_file(path) != weight.sha256:
                log.warning(
                    "%s: sha256 differs from the official %s file: not the authors' weights",
                    path,
                    self.name,
                )
        if network_size is not None and self.sized_loader is not None:
            return self.sized_loader(self.folder(weights_dir), map_location, network_size)
        return self.loader(self.folder(weights_dir), map_location)


class UnknownModelError(KeyError):
    """A model name that is not in the registry; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def _load_instcolor(folder: Path, map_location: MapLocation) -> ColorizationNetworks:
    return load_networks(folder, map_location)


def _load_eccv16(folder: Path, map_location: MapLocation) -> AutomaticColorizer:
    return load_zhang_eccv16(folder / ECCV16_FILENAME, map_location)


def _load_siggraph17(folder: Path, map_location: MapLocation) -> AutomaticColorizer:
    return load_zhang_siggraph17(folder / SIGGRAPH17_FILENAME, map_location)


def _load_larsson(folder: Path, map_location: MapLocation) -> AutomaticColorizer:
    return load_larsson_eccv16(folder / LARSSON_FILENAME, map_location)


def _load_larsson_sized(folder: Path, map_location: MapLocation, size: int) -> AutomaticColorizer:
    return load_larsson_eccv16(folder / LARSSON_FILENAME, map_location, network_size=size)


def _load_li(folder: Path, map_location: MapLocation) -> AutomaticColorizer:
    return load_li_dcnn(folder / LI_FILENAME, map_location)


def _load_zhao(folder: Path, map_location: MapLocation) -> AutomaticColorizer:
    return load_zhao_pixelated(folder / ZHAO_FILENAME, map_location)


_INSTCOLOR_ZIP = f"https://drive.google.com/uc?export=download&id={OFFICIAL_ZIP_DRIVE_ID}"

INSTCOLOR = ModelSpec[ColorizationNetworks](
    name="instcolor",
    title="InstColorization (COCOStuff-finetuned release)",
    paper="Su, Chu, Huang, Instance-aware Image Colorization, CVPR 2020",
    weights=tuple(
        WeightFile(spec.filename, _INSTCOLOR_ZIP, packed_in="checkpoints.zip")
        for spec in NETWORK_FILES
    ),
    input_size=256,
    uses_detector=True,
    preprocessing="RGB -> PIL bilinear 256x256 -> Lab L; input cat((L-50)/100, 0, 0, -0.5)",
    decoding="tanh ab x 110 (fusion net with boxes, full-image net without)",
    loader=_load_instcolor,
    folder_name=f"checkpoints/{OFFICIAL_VARIANT}",  # where fetch-weights has always put them
)

ZHANG_ECCV16 = ModelSpec[AutomaticColorizer](
    name="zhang-eccv16",
    title="Zhang et al. ECCV 2016 (PyTorch release v2)",
    paper="Zhang, Isola, Efros, Colorful Image Colorization, ECCV 2016",
    weights=(
        WeightFile(
            ECCV16_FILENAME,
            ZHANG_BASE_URL + ECCV16_FILENAME,
            sha256="9b330a0bae53f4ded77b1e23defbf78beaa09c10ebc4c4999e8e4f4a160b93f9",
        ),
    ),
    input_size=ECCV16_INPUT_SIZE,
    uses_detector=False,
    preprocessing="Lab L at 256x256; input (L-50)/100",
    decoding="softmax(z/T) over 313 bins (T=1 as the release), 1x1 expectation, bilinear x4, x110",
    loader=_load_eccv16,
)

ZHANG_SIGGRAPH17 = ModelSpec[AutomaticColorizer](
    name="zhang-siggraph17",
    takes_hints=True,
    title="Zhang et al. SIGGRAPH 2017, automatic mode (no hints)",
    paper="Zhang, Zhu, Isola, Geng, Lin, Yu, Efros, Real-Time User-Guided Image Colorization "
    "with Learned Deep Priors, SIGGRAPH 2017",
    weights=(
        WeightFile(
            SIGGRAPH17_FILENAME,
            ZHANG_BASE_URL + SIGGRAPH17_FILENAME,
            sha256="df00044c0a4d7c3edcecf6f75437ce346a66e7a42612d9b968e1a7e17dbc6f66",
            size=136_787_426,
        ),
    ),
    input_size=SIGGRAPH17_INPUT_SIZE,
    uses_detector=False,
    preprocessing="Lab L at 256x256; input cat((L-50)/100, ab/110 = 0, mask = 0)",
    decoding="tanh ab x 110 at the input size",
    loader=_load_siggraph17,
)

LARSSON_ECCV16 = ModelSpec[AutomaticColorizer](
    name="larsson-eccv16",
    title="Larsson et al. ECCV 2016 (autocolorize release, converted from Caffe)",
    paper="Larsson, Maire, Shakhnarovich, Learning Representations for Automatic Colorization, "
    "ECCV 2016",
    weights=(
        WeightFile(
            LARSSON_FILENAME,
            LARSSON_SOURCE_URL,
            # The converted file's sha256 is what convert_caffe_hdf5 returns; no official digest.
            converted_from=WeightFile(
                LARSSON_SOURCE_FILENAME, LARSSON_SOURCE_URL, size=LARSSON_SOURCE_SIZE
            ),
            convert=convert_caffe_hdf5,
        ),
    ),
    input_size=LARSSON_INPUT_SIZE,
    uses_detector=False,
    preprocessing="grey = L/100 at 256x256, centre-padded with zeros into the 512x512 network",
    decoding="median chroma, circular-mean hue with chromatic fading (0.03), HSV -> RGB, "
    "lightness matched, RGB -> Lab ab",
    loader=_load_larsson,
    sized_loader=_load_larsson_sized,
)

LI_DCNN = ModelSpec[AutomaticColorizer](
    name="li-dcnn",
    title="Li et al. instance-aware DCNN (no published weights: trained with `train --model li-dcnn`)",
    paper="Li, Zeng, Xiao, Wang, The Instance-Aware Automatic Image Colorization Based on Deep "
    "Convolutional Neural Network, Intelligent Automation & Soft Computing 26(4), 2020",
    # No official file: the name is what `train --model li-dcnn` writes, the URL is empty.
    weights=(WeightFile(LI_FILENAME, ""),),
    input_size=LI_INPUT_SIZE,
    uses_detector=False,
    preprocessing="Lab L at 256x256 (exactly: the classification branch is fully connected); "
    "input (L-50)/100",
    decoding="annealed mean softmax(z/T) over 313 bins, T=0.38 (ECCV16's), 1x1 expectation, "
    "bilinear x4, x110",
    loader=_load_li,
    published=False,
)

ZHAO_PIXELATED = ModelSpec[AutomaticColorizer](
    name="zhao-pixelated",
    title="Zhao et al. pixelated semantic colorization (built from the paper; train it here)",
    paper="Zhao, Han, Shao, Snoek, Pixelated Semantic Colorization, IJCV 2019",
    # No published weights: the file is what `train --model zhao-pixelated` writes.
    weights=(WeightFile(ZHAO_FILENAME, ""),),
    input_size=ZHAO_INPUT_SIZE,
    uses_detector=False,
    preprocessing="Lab L at 128x128; input (L-50)/100",
    decoding="autoregressive samples of 32x32 ab from a 10-logistic mixture (seeded), "
    "bilinear x4, x110",
    loader=_load_zhao,
    max_samples=ZHAO_MAX_SAMPLES,
    published=False,
)

MODELS: Mapping[str, ModelSpec[Any]] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            INSTCOLOR,
            ZHANG_ECCV16,
            ZHANG_SIGGRAPH17,
            LARSSON_ECCV16,
            LI_DCNN,
            ZHAO_PIXELATED,
        )
    }
)


def model_names() -> tuple[str, ...]:
    return tuple(MODELS)


def get_model(name: str) -> ModelSpec[Any]:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(MODELS)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None
