"""Training ``zhao-pixelated`` as the paper describes (Zhao et al., IJCV 2019, section 4.1).

* Data: a ``prepare-data`` manifest; each photo squashed to 128 x 128 (PIL bilinear), Lab L in,
  the ab target averaged to the 32 x 32 grid of the generator and put on the 256 bins.
* Segmentation labels, at 32 x 32 (nearest): from COCO-Stuff-style label maps when
  ``labels_dir`` is given (``<labels_dir>/<photo path with .png>``, 8-bit class ids, 255 ignored,
  ``classes`` default 183), otherwise **pseudo-labels from the detector's boxes** stored in the
  manifest: 1 inside any detected box, 0 elsewhere (``classes`` 2). The manifest keeps boxes, not
  the detector's classes or masks, so this is the rule; label maps are what the paper used.
* Loss: ``1 * L_emb + 100 * L_seg + 1 * L_gen`` (the paper's 1 : 100 : 1): discretised 10-logistic
  NLL of the embedding's own mixture and of the generator's (teacher forcing on the target ab,
  conditioned on ``cat(f, softmax(h))``), cross-entropy of the segmentation.
* Adam, learning rate 1e-3, moments (0.95, 0.9995); Polyak averaging of the parameters
  (exponential, decay 0.9995); the averaged model is what is written and served.
* Files: ``RUN/weights/zhao-pixelated/zhao_pixelated.pth`` (``serve --models zhao-pixelated
  --weights-dir RUN/weights``), ``RUN/state.pt`` (resume), ``RUN/metrics.jsonl``,
  ``RUN/config.json``.

One process (no torchrun for this model yet).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

from models.lab import rgb_to_lab
from models.preprocess import to_tensor
from models.zhao_pixelated import (
    COCO_STUFF_CLASSES,
    DEFAULT_GENERATOR_CHANNELS,
    DEFAULT_GENERATOR_LAYERS,
    DOWNSAMPLE,
    FILENAME,
    INPUT_SIZE,
    ZhaoPixelated,
    low_resolution_ab,
    mixture_nll,
    save_zhao_pixelated,
)
from training.data import load_photo
from training.distributed import resolve_device
from training.manifest import ManifestRow, read_manifest
from training.run_files import load_state, read_metrics, save_state, write_config, write_metrics

log = logging.getLogger(__name__)

MODEL_NAME = "zhao-pixelated"
LOSS_WEIGHTS = (1.0, 100.0, 1.0)  # lambda_1 : lambda_2 : lambda_3 (embedding, segmentation, gen)
LEARNING_RATE = 1e-3
ADAM_BETAS = (0.95, 0.9995)  # "momentum to 0.95 and second momentum to 0.9995"
POLYAK_DECAY = 0.9995
IGNORE_LABEL = 255
BOX_CLASSES = 2  # pseudo-labels from boxes: background, inside a detected box


class ZhaoTrainingError(RuntimeError):
    """A configuration or data problem found before training; the message says how to fix it."""


@dataclass
class ZhaoTrainOptions:
    data: Path
    output: Path
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    lr: float = LEARNING_RATE
    labels_dir: Path | None = None
    classes: int | None = None  # default: 183 with label maps, 2 with box pseudo-labels
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: after every epoch (and at the end)
    generator_layers: int = DEFAULT_GENERATOR_LAYERS
    generator_channels: int = DEFAULT_GENERATOR_CHANNELS
    divisor: int = 1  # > 1 narrows Tables 1 and 2 (tests and quick benchmarks; not the paper)
    workers: int = 0


def segmentation_target(
    row: ManifestRow, labels_dir: Path | None, grid: int = INPUT_SIZE // DOWNSAMPLE
) -> torch.Tensor:
    """(grid, grid) class ids: the label map (nearest) or the box pseudo-labels."""
    if labels_dir is not None:
        path = (labels_dir / row.path).with_suffix(".png")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no label map for {row.file} (--labels DIR)")
        with Image.open(path) as opened:
            labels = opened.convert("L").resize((grid, grid), Image.Resampling.NEAREST)
        return torch.from_numpy(np.array(labels, dtype=np.int64))
    target = torch.zeros((grid, grid), dtype=torch.int64)
    sx, sy = grid / row.width, grid / row.height
    for x1, y1, x2, y2 in row.boxes:
        c1, r1 = int(x1 * sx), int(y1 * sy)
        c2, r2 = max(c1 + 1, int(np.ceil(x2 * sx))), max(r1 + 1, int(np.ceil(y2 * sy)))
        target[r1:r2, c1:c2] = 1
    return target


class ZhaoDataset(Dataset[dict[str, torch.Tensor]]):
    """L at 128, the 32 x 32 binned ab target, the 32 x 32 segmentation target."""

    def __init__(self, rows: Sequence[ManifestRow], labels_dir: Path | None) -> None:
        self.rows = list(rows)
        self.labels_dir = labels_dir

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        photo = load_photo(row).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
        lab = rgb_to_lab(to_tensor(photo))
        return {
            "lightness": lab[0:1],
            "ab": low_resolution_ab(lab[1:3][None])[0],
            "segmentation": segmentation_target(row, self.labels_dir),
        }


@dataclass(frozen=True)
class Losses:
    embedding: torch.Tensor
    segmentation: torch.Tensor
    generator: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        l1, l2, l3 = LOSS_WEIGHTS
        return l1 * self.embedding + l2 * self.segmentation + l3 * self.generator

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_emb": float(self.embedding.detach()),
            "loss_seg": float(self.segmentation.detach()),
            "loss_gen": float(self.generator.detach()),
        }


def zhao_losses(model: ZhaoPixelated, batch: dict[str, torch.Tensor]) -> Losses:
    """The three losses of one batch (teacher forcing for the generator)."""
    outputs = model.condition(batch["lightness"])
    target = batch["ab"]
    return Losses(
        embedding=mixture_nll(outputs.embedding_params, target),
        segmentation=F.cross_entropy(
            outputs.segmentation, batch["segmentation"], ignore_index=IGNORE_LABEL
        ),
        generator=mixture_nll(model.full_parameters(target, outputs.condition), target),
    )


def weights_path(run_dir: Path) -> Path:
    return run_dir / "weights" / MODEL_NAME / FILENAME


def _checked(options: ZhaoTrainOptions) -> tuple[list[ManifestRow], int]:
    rows = [r for r in read_manifest(options.data) if r.split == "train"]
    if not rows:
        raise ZhaoTrainingError(f"{options.data}: no training images in the manifest")
    classes = options.classes or (
        COCO_STUFF_CLASSES if options.labels_dir is not None else BOX_CLASSES
    )
    if options.labels_dir is not None and not options.labels_dir.is_dir():
        raise ZhaoTrainingError(f"--labels {options.labels_dir}: not a folder")
    if options.resume and not (options.output / "state.pt").is_file():
        raise ZhaoTrainingError(f"{options.output}: nothing to resume (no state.pt)")
    return rows, classes


def train_zhao(options: ZhaoTrainOptions) -> int:
    """Train; returns 0. Writes the Polyak-averaged weights and the state at each save."""
    rows, classes = _checked(options)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    device = resolve_device(options.device)
    model = ZhaoPixelated(
        classes, options.generator_layers, options.generator_channels, options.divisor
    ).to(device)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(POLYAK_DECAY))
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr, betas=ADAM_BETAS)
    step, epoch = 0, 0
    metrics: list[dict[str, Any]] = []
    if options.resume:
        state = load_state(options.output)
        model.load_state_dict(state["model"])
        averaged.load_state_dict(state["averaged"])
        optimiser.load_state_dict(state["optimiser"])
        step, epoch = int(state["step"]), int(state["epoch"])
        metrics = [r for r in read_metrics(options.output) if r.get("step", 0) <= step]
    options.output.mkdir(parents=True, exist_ok=True)
    write_config({**asdict(options), "classes": classes, "model": MODEL_NAME}, options.output)
    dataset = ZhaoDataset(rows, options.labels_dir)

    def save() -> None:
        save_zhao_pixelated(averaged.module, weights_path(options.output))  # type: ignore[arg-type]
        state = {
            "model": model.state_dict(),
            "averaged": averaged.state_dict(),
            "optimiser": optimiser.state_dict(),
            "step": step,
            "epoch": epoch,
        }
        save_state(state, options.output)
        write_metrics(metrics, options.output)

    started = time.perf_counter()
    done = options.max_steps is not None and step >= options.max_steps
    while not done and epoch < options.epochs:
        generator = torch.Generator().manual_seed(options.seed + epoch)
        loader = DataLoader(
            dataset,
            batch_size=options.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=options.workers,
            drop_last=len(dataset) > options.batch_size,
        )
        model.train()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            losses = zhao_losses(model, batch)
            optimiser.zero_grad(set_to_none=True)
            losses.total.backward()
            optimiser.step()
            averaged.update_parameters(model)
            step += 1
            if step % options.log_every == 0 or step == 1:
                row = {"step": step, "epoch": epoch, **losses.as_floats()}
                row["seconds"] = time.perf_counter() - started
                metrics.append(row)
                log.info("step %d: %s", step, losses.as_floats())
            if options.save_every and step % options.save_every == 0:
                save()
            if options.max_steps is not None and step >= options.max_steps:
                done = True
                break
        else:
            epoch += 1
            save()
    save()
    return 0
