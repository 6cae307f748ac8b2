"""Checkpoint writes on top of the torch-free ``models.atomic`` (fsync, then ``os.replace``)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.atomic import write_atomic


def save_torch_atomic(obj: object, path: Path) -> None:
    write_atomic(path, lambda handle: torch.save(obj, handle))
