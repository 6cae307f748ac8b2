"""Checkpoints as data, and the strict loader (spec §1.3, §1.4, §7 quirks 16-17).

Two layouts are understood:

* **official**: a folder with ``latest_net_G.pth`` (instance net), ``latest_net_GF.pth`` (fusion
  net) and ``latest_net_GComp.pth`` (full-image net), plain state dicts; one leading ``module.`` is
  stripped from every key (the authors' GF file has it, G and GComp do not).
* **mmagic**: OpenMMLab's single-file conversion: tensors under ``state_dict`` with the prefixes
  ``instance_model.``, ``fusion_model.`` and ``image_model.``, and seven single-layer modules stored
  without their Sequential ``.0``.

Every load is ``weights_only=True`` with ``map_location``, then strict: a missing, unexpected or
wrongly shaped key is an error naming the file and the first offending keys. The reference's
``strict=False`` silently produced grey output; that cannot happen here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from models.atomic import write_text_atomic
from models.networks import (
    ColorizationTrunk,
    FullImageGenerator,
    FusionGenerator,
    InstanceGenerator,
)

log = logging.getLogger(__name__)

Role = Literal["instance", "fusion", "full_image"]
OFFICIAL_WIDTH = 64
OFFICIAL_VARIANT = "coco_finetuned_mask_256_ffs"
HINTS_MARKER = "hints.json"
"""Written beside the three files by ``train --hint-sample-p P`` (P < 1): the networks were
trained with random colour hints, so the pipeline passes a user's hints to them. The released
checkpoints have none, so they keep refusing hints (docs/hints.md)."""


@dataclass(frozen=True)
class NetworkFile:
    """One network of the checkpoint set: its role, official file name and expected key count."""

    role: Role
    filename: str
    mmagic_prefix: str
    entries: int
    network: type[ColorizationTrunk]


NETWORK_FILES: tuple[NetworkFile, ...] = (
    NetworkFile("instance", "latest_net_G.pth", "instance_model.", 107, InstanceGenerator),
    NetworkFile("fusion", "latest_net_GF.pth", "fusion_model.", 275, FusionGenerator),
    NetworkFile("full_image", "latest_net_GComp.pth", "image_model.", 107, FullImageGenerator),
)

MMAGIC_FILENAME = "inst-colorizatioon_full_official_cocostuff-256x256-5b9d4eee.pth"
MMAGIC_URL = f"https://download.openmmlab.com/mmediting/inst_colorization/{MMAGIC_FILENAME}"
OFFICIAL_ZIP_DRIVE_ID = "1Xb-DKAA9ibCVLqm8teKd1MWk6imjwTBh"

# Single-layer modules that MMagic stores without the reference's one-element Sequential.
_MMAGIC_BARE = ("model8up", "model9up", "model10up", "model3short8", "model2short9",
                "model1short10", "model_class")  # fmt: skip
_MMAGIC_BARE_KEY = re.compile(rf"^({'|'.join(_MMAGIC_BARE)})\.(weight|bias)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the network; the message says which."""


@dataclass(frozen=True)
class LoadedFile:
    path: Path
    sha256: str


@dataclass(frozen=True)
class ColorizationNetworks:
    """G, GF and GComp loaded strictly, in eval mode, plus where they came from."""

    instance: InstanceGenerator
    fusion: FusionGenerator
    full_image: FullImageGenerator
    layout: Literal["official", "mmagic"]
    files: tuple[LoadedFile, ...]
    width: int
    takes_hints: bool = False  # trained with colour hints (``HINTS_MARKER`` beside the files)

    @property
    def version(self) -> str:
        """A short content hash of the weight files: the model version."""
        digest = hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()
        return f"instcolor-{digest[:12]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_official_dir(path: Path) -> Path | None:
    """The folder holding the three official files: ``path`` itself or the unzipped layout below it."""
    candidates = [
        path,
        path / OFFICIAL_VARIANT,
        path / "checkpoints" / OFFICIAL_VARIANT,
    ]
    for candidate in candidates:
        if all((candidate / spec.filename).is_file() for spec in NETWORK_FILES):
            return candidate
    return None


def missing_files(path: Path) -> list[Path]:
    """What is missing for ``path`` to be a loadable checkpoint location (empty if loadable).

    Named where ``fetch-weights`` puts them (``path/coco_finetuned_mask_256_ffs/``), unless ``path``
    already holds some of the files directly or is that folder itself.
    """
    if path.is_file():
        return []
    if find_official_dir(path) is not None:
        return []
    direct = path.name == OFFICIAL_VARIANT or any(
        (path / spec.filename).is_file() for spec in NETWORK_FILES
    )
    folder = path if direct else path / OFFICIAL_VARIANT
    return [
        folder / spec.filename for spec in NETWORK_FILES if not (folder / spec.filename).is_file()
    ]


def read_state_dict(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types for damaged files (even KeyError)
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
            "the file is truncated, corrupt or not a PyTorch state dict"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return dict(loaded)


def strip_module_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove one leading ``module.`` (DataParallel) from every key, tolerating its absence."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def load_strict(network: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Load ``state`` into ``network`` refusing any missing, unexpected or mis-shaped key."""
    expected = network.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    not_tensors = sorted(k for k in state if k not in tensors)
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {_first(not_tensors)}")
    missing = [k for k in expected if k not in tensors]
    # num_batches_tracked has no effect at inference (spec §1.3); fill it in if a file lacks it.
    for key in [k for k in missing if k.endswith("num_batches_tracked")]:
        tensors[key] = torch.zeros((), dtype=torch.long)
        missing.remove(key)
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first(unexpected)}")
        raise CheckpointError(
            f"{source}: does not match {type(network).__name__}: " + "; ".join(parts)
        )
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{source}: wrong shapes: {_first(wrong)}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: non-finite values in {_first(bad)}")
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def _width_of(state: Mapping[str, Any], source: str) -> int:
    weight = state.get("model1.0.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise CheckpointError(f"{source}: missing keys: model1.0.weight")
    return int(weight.shape[0])


def _build(spec: NetworkFile, state: Mapping[str, Any], source: str, width: int) -> nn.Module:
    network = spec.network(width)
    load_strict(network, state, source)
    return network.eval().requires_grad_(False)


def _mmagic_to_reference(key: str) -> str:
    """``model8up.weight`` -> ``model8up.0.weight`` for the seven bare modules; others unchanged."""
    return _MMAGIC_BARE_KEY.sub(r"\1.0.\2", key)


def split_mmagic(state: Mapping[str, Any], source: str) -> dict[Role, dict[str, Any]]:
    """The MMagic file's one state dict -> one reference-keyed state dict per network."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    state = strip_module_prefix(state)
    parts: dict[Role, dict[str, Any]] = {spec.role: {} for spec in NETWORK_FILES}
    unknown = []
    for key, value in state.items():
        for spec in NETWORK_FILES:
            if key.startswith(spec.mmagic_prefix):
                parts[spec.role][_mmagic_to_reference(key.removeprefix(spec.mmagic_prefix))] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected keys (not instance_model./fusion_model./image_model.): "
            f"{_first(unknown)}"
        )
    empty = [spec.mmagic_prefix for spec in NETWORK_FILES if not parts[spec.role]]
    if empty:
        raise CheckpointError(
            f"{source}: no keys with prefix {', '.join(empty)}; not an MMagic "
            "InstColorization checkpoint"
        )
    return parts


def read_hints_marker(folder: Path) -> bool:
    """Whether ``folder`` holds a valid ``HINTS_MARKER`` (a JSON object with ``hint_sample_p`` < 1)."""
    path = folder / HINTS_MARKER
    if not path.is_file():
        return False
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        p = float(marker["hint_sample_p"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f'{path}: not a hints marker ({exc}); expected {{"hint_sample_p": P}} with 0 < P < 1, '
            "as train --hint-sample-p writes it (delete the file if the weights take no hints)"
        ) from None
    return 0.0 < p < 1.0


def write_hints_marker(folder: Path, hint_sample_p: float) -> None:
    """Mark ``folder`` as trained with hints (P < 1), or remove a stale marker (P = 1)."""
    path = folder / HINTS_MARKER
    if hint_sample_p >= 1.0:
        path.unlink(missing_ok=True)
        return
    marker = {"hint_sample_p": hint_sample_p, "mask": "mask - 0.5: +0.5 hinted, -0.5 elsewhere"}
    write_text_atomic(path, json.dumps(marker, indent=2) + "\n")


def load_networks(
    path: Path | str, map_location: str | torch.device = "cpu"
) -> ColorizationNetworks:
    """Load G, GF and GComp from an official folder or an MMagic file, strictly."""
    path = Path(path)
    states: dict[Role, tuple[dict[str, Any], str]] = {}
    files: list[LoadedFile] = []
    layout: Literal["official", "mmagic"]
    takes_hints = False
    if path.is_file():
        layout = "mmagic"
        parts = split_mmagic(read_state_dict(path, map_location), str(path))
        for spec in NETWORK_FILES:
            states[spec.role] = (parts[spec.role], f"{path} [{spec.mmagic_prefix}*]")
        files.append(LoadedFile(path, sha256_file(path)))
    else:
        layout = "official"
        folder = find_official_dir(path)
        if folder is None:
            missing = ", ".join(str(p) for p in missing_files(path))
            raise CheckpointError(
                f"checkpoint files not found: {missing}. Put the official files there or run "
                "`python -m service fetch-weights --dir <dir>`"
            )
        for spec in NETWORK_FILES:
            file = folder / spec.filename
            states[spec.role] = (
                strip_module_prefix(read_state_dict(file, map_location)),
                str(file),
            )
            files.append(LoadedFile(file, sha256_file(file)))
        takes_hints = read_hints_marker(folder)

    widths = {role: _width_of(state, source) for role, (state, source) in states.items()}
    if len(set(widths.values())) != 1:
        raise CheckpointError(f"{path}: the three networks have different widths {widths}")
    width = next(iter(widths.values()))
    if width != OFFICIAL_WIDTH:
        log.warning(
            "checkpoint width %d is not the official %d: not the authors' weights",
            width,
            OFFICIAL_WIDTH,
        )
    nets = {
        spec.role: _build(spec, states[spec.role][0], states[spec.role][1], width)
        for spec in NETWORK_FILES
    }
    instance, fusion, full_image = nets["instance"], nets["fusion"], nets["full_image"]
    assert isinstance(instance, InstanceGenerator)
    assert isinstance(fusion, FusionGenerator)
    assert isinstance(full_image, FullImageGenerator)
    return ColorizationNetworks(
        instance, fusion, full_image, layout, tuple(files), width, takes_hints
    )
