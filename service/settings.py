"""Typed settings, read from ``COLORIZE_*`` environment variables and validated at start-up.

``ModelSettings`` is what any process that loads the model needs (the ``colorize`` command, the
server, a GPU worker). Command-line flags override the environment (see ``commands/model_flags``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.checkpoints import missing_files
from models.detector import DETECTOR_WEIGHTS

DEFAULT_WEIGHTS_DIR = Path("weights")


class ModelSettings(BaseSettings):
    """Where the weights are and how to run them."""

    model_config = SettingsConfigDict(env_prefix="COLORIZE_", extra="ignore")

    checkpoints: Path = Field(
        default=DEFAULT_WEIGHTS_DIR / "checkpoints",
        description="Folder with latest_net_{G,GF,GComp}.pth (or the unzipped official "
        "checkpoints/ folder above it), or one MMagic .pth file.",
    )
    detector: bool = Field(
        default=True,
        description="Run the Mask R-CNN detector. false: full-image colorization only, unless a "
        "request supplies boxes.",
    )
    detector_weights: Path = Field(
        default=DEFAULT_WEIGHTS_DIR / DETECTOR_WEIGHTS["v1"].filename,
        description="torchvision COCO Mask R-CNN state dict (read from disk, never downloaded).",
    )
    detector_version: Literal["v1", "v2"] = Field(
        default="v1", description="maskrcnn_resnet50_fpn (v1) or maskrcnn_resnet50_fpn_v2 (v2)."
    )
    device: str = Field(
        default="auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N."
    )
    precision: Literal["auto", "fp32", "fp16"] = Field(
        default="auto",
        description="auto: fp16 on CUDA, fp32 on CPU. fp16 keeps the fusion softmax and Lab in fp32.",
    )
    instance_limit: int = Field(
        default=8, ge=0, le=64,
        description="Upper bound on instances per image a request may ask for (the reference uses 8).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch  # the HTTP-only API process never needs torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_precision(self) -> Literal["fp32", "fp16"]:
        if self.precision != "auto":
            return self.precision
        return "fp16" if self.resolved_device().startswith("cuda") else "fp32"

    def missing_weight_files(self) -> list[Path]:
        """Files that must exist before the model can load; empty when all are there."""
        missing = missing_files(self.checkpoints)
        if self.detector and not self.detector_weights.is_file():
            missing.append(self.detector_weights)
        return missing
