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
* Validation on the manifest's ``val`` split (after every epoch, every ``val_every`` steps, at the
  end): the Polyak-averaged model (the one written and served), each image's three losses and
  their weighted total, averaged over the images; ``"split": "val"`` rows of ``metrics.jsonl``.

Under torchrun (``--batch-size`` per process) the network is wrapped in DistributedDataParallel
(gloo on CPU, NCCL on CUDA): the gradients are averaged, so N processes with batch B step as one
with batch N x B (exactly with box pseudo-labels; with label maps that ignore pixels (255) each
process's segmentation loss is the mean over its own labelled pixels). There is no BatchNorm, and
every parameter takes part in the loss. The Polyak average is updated on every rank from the
synchronised parameters, so it is the same everywhere (the one parameter no loss reaches is frozen:
``freeze_unused``); rank 0 alone writes. The sampler is
``training.loop.ResumableSampler``, so a run saved mid-epoch resumes at the next batch, never
repeating or skipping one. Validation is sharded over the ranks (every N-th image) and gathered.
A SIGINT / SIGTERM reaching any rank stops all of them after the current step, saved (130 / 143).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
from training import distributed
from training.data import load_photo
from training.loop import (
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ResumableSampler,
    StopRequest,
    _ignore_sigint,
    _rng_state,
    _set_rng_state,
)
from training.manifest import ManifestRow, read_manifest
from training.run_files import load_state, read_metrics, save_state, write_config, write_metrics
from training.validation import interleave, shard

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
    val_every: int = 0  # steps between validations; 0: after every epoch (and at the end)
    val_limit: int | None = None  # at most this many validation images


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

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        row = self.rows[
            key[1] if isinstance(key, tuple) else key
        ]  # (epoch, index) from the sampler
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


def freeze_unused(model: ZhaoPixelated) -> list[str]:
    """Stop the gradient of the one parameter the losses never reach; returns its name.

    The head reads the last gated layer's horizontal stack only, so that layer's vertical output,
    and with it its conditioning weight ``cond_vertical``, feeds nothing (its vertical convolution
    still does, through ``vertical_to_horizontal``). Adam never changed it (no gradient); frozen,
    DistributedDataParallel has no unused parameter to wait for.
    """
    last = model.generator.gated_layers()[-1]
    last.cond_vertical.requires_grad_(False)
    index = len(model.generator.layers) - 1
    return [f"generator.layers.{index}.cond_vertical.weight"]


class TrainingForward(nn.Module):
    """The three outputs the losses need in one ``forward`` (what DistributedDataParallel wraps):
    the embedding's mixture, the segmentation logits and the generator's mixture (teacher
    forcing on the target ab)."""

    def __init__(self, model: ZhaoPixelated) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, lightness: torch.Tensor, ab: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model.condition(lightness)
        generated = self.model.full_parameters(ab, outputs.condition)
        return outputs.embedding_params, outputs.segmentation, generated


def losses_of(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]
) -> Losses:
    embedding, segmentation, generated = outputs
    target = batch["ab"]
    return Losses(
        embedding=mixture_nll(embedding, target),
        segmentation=F.cross_entropy(
            segmentation, batch["segmentation"], ignore_index=IGNORE_LABEL
        ),
        generator=mixture_nll(generated, target),
    )


def zhao_losses(model: ZhaoPixelated, batch: dict[str, torch.Tensor]) -> Losses:
    """The three losses of one batch (teacher forcing for the generator)."""
    return losses_of(TrainingForward(model)(batch["lightness"], batch["ab"]), batch)


def weights_path(run_dir: Path) -> Path:
    return run_dir / "weights" / MODEL_NAME / FILENAME


def _checked(options: ZhaoTrainOptions) -> tuple[list[ManifestRow], list[ManifestRow], int]:
    rows = read_manifest(options.data)
    train_rows = [r for r in rows if r.split == "train"]
    if not train_rows:
        raise ZhaoTrainingError(f"{options.data}: no training images in the manifest")
    val_rows = [r for r in rows if r.split == "val"][: options.val_limit]
    classes = options.classes or (
        COCO_STUFF_CLASSES if options.labels_dir is not None else BOX_CLASSES
    )
    if options.labels_dir is not None and not options.labels_dir.is_dir():
        raise ZhaoTrainingError(f"--labels {options.labels_dir}: not a folder")
    if options.resume and not (options.output / "state.pt").is_file():
        raise ZhaoTrainingError(f"{options.output}: nothing to resume (no state.pt)")
    return train_rows, val_rows, classes


@torch.no_grad()
def score_zhao(model: ZhaoPixelated, batches: Any, device: torch.device) -> list[dict[str, float]]:
    """Per validation image, in order: its three losses and their weighted total."""
    rows: list[dict[str, float]] = []
    forward = TrainingForward(model)
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        outputs = forward(batch["lightness"], batch["ab"])
        for i in range(len(batch["ab"])):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            rows.append(losses_of(tuple(o[i : i + 1] for o in outputs), one).as_floats())
    return rows


def summarize_zhao(rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Means over the images of each loss (``loss`` is the weighted total)."""
    keys = ("loss", "loss_emb", "loss_seg", "loss_gen")
    return {"images": len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in keys}}


def train_zhao(options: ZhaoTrainOptions) -> int:
    """Train; 0 done, 130 / 143 stopped by a signal (saved). Writes the Polyak-averaged weights and
    the state at each save."""
    train_rows, val_rows, classes = _checked(options)
    context = distributed.init_distributed(options.device)
    try:
        with StopRequest() as stop:
            return _train(options, train_rows, val_rows, classes, context, stop)
    finally:
        distributed.shutdown(context)


def _train(
    options: ZhaoTrainOptions,
    train_rows: list[ManifestRow],
    val_rows: list[ManifestRow],
    classes: int,
    context: distributed.DistContext,
    stop: StopRequest,
) -> int:
    device = context.device
    global_batch = options.batch_size * context.world_size
    if len(train_rows) < global_batch:
        raise ZhaoTrainingError(
            f"{len(train_rows)} training images in {options.data} but the batch is "
            f"{options.batch_size} x {context.world_size} processes = {global_batch}; lower "
            "--batch-size or add photos"
        )
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    model = ZhaoPixelated(
        classes, options.generator_layers, options.generator_channels, options.divisor
    ).to(device)
    freeze_unused(model)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(POLYAK_DECAY))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(trained, lr=options.lr, betas=ADAM_BETAS)
    step = epoch = position = 0
    metrics: list[dict[str, Any]] = []
    if options.resume:
        state = load_state(options.output)
        model.load_state_dict(state["model"])
        averaged.load_state_dict(state["averaged"])
        try:
            optimiser.load_state_dict(state["optimiser"])
        except ValueError as exc:  # a run from before freeze_unused: one more parameter
            raise ZhaoTrainingError(
                f"{options.output / 'state.pt'}: its optimiser state does not fit the trained "
                f"parameters ({exc}); it predates this version: start a new --output"
            ) from exc
        step, epoch = int(state["step"]), int(state["epoch"])
        position = int(state.get("position", 0))  # older runs: the epoch's start
        if "rng" in state:
            _set_rng_state(state["rng"])
        metrics = [r for r in read_metrics(options.output) if r.get("step", 0) <= step]
    if context.is_main:
        options.output.mkdir(parents=True, exist_ok=True)
        write_config(
            {**asdict(options), "classes": classes, "model": MODEL_NAME,
             "world_size": context.world_size, "global_batch_size": global_batch,
             "train_images": len(train_rows), "val_images": len(val_rows)},
            options.output,
        )  # fmt: skip
    dataset = ZhaoDataset(train_rows, options.labels_dir)
    val_set = ZhaoDataset(val_rows, options.labels_dir)
    forward: nn.Module = TrainingForward(model)
    if context.distributed:
        forward = DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = ResumableSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
        seed=options.seed, drop_last=True,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=options.batch_size, sampler=sampler, num_workers=options.workers,
        drop_last=True, worker_init_fn=_ignore_sigint if options.workers else None,
    )  # fmt: skip
    val_shard = shard(val_set, len(val_set), context.rank, context.world_size)

    def save() -> None:
        if context.is_main:
            save_zhao_pixelated(averaged.module, weights_path(options.output))  # type: ignore[arg-type]
            state = {
                "model": model.state_dict(),
                "averaged": averaged.state_dict(),
                "optimiser": optimiser.state_dict(),
                "step": step,
                "epoch": epoch,
                "position": position,
                "rng": _rng_state(),
            }
            save_state(state, options.output)
            write_metrics(metrics, options.output)
        distributed.barrier(context)

    def validate() -> None:
        """Each rank scores its share with the averaged model; rank 0 records the whole."""
        if not len(val_set):
            return
        loader = DataLoader(val_shard, batch_size=options.batch_size)
        mine = score_zhao(averaged.module, loader, device)  # type: ignore[arg-type]
        shards: Any = distributed.all_gather_objects(mine, context)
        row = {"split": "val", "step": step, "epoch": epoch, **summarize_zhao(interleave(shards))}
        metrics.append(row)
        if context.is_main:
            log.info("val step %d: loss %.4f", step, row["loss"])

    started = time.perf_counter()
    done = options.max_steps is not None and step >= options.max_steps
    model.train()
    while not done and epoch < options.epochs:
        sampler.set_epoch(epoch)
        sampler.skip = position * options.batch_size
        for cpu_batch in loader:
            position += 1
            batch = {k: v.to(device) for k, v in cpu_batch.items()}
            losses = losses_of(forward(batch["lightness"], batch["ab"]), batch)
            optimiser.zero_grad(set_to_none=True)
            losses.total.backward()
            optimiser.step()
            averaged.update_parameters(model)
            step += 1
            if step % options.log_every == 0 or step == 1:
                values = {
                    k: distributed.all_reduce_mean(v, context)
                    for k, v in losses.as_floats().items()
                }
                row = {"step": step, "epoch": epoch, **values}
                row["seconds"] = time.perf_counter() - started
                metrics.append(row)
                if context.is_main:
                    log.info("step %d: %s", step, values)
            if options.val_every and step % options.val_every == 0:
                validate()
            if options.save_every and step % options.save_every == 0:
                save()
            if options.max_steps is not None and step >= options.max_steps:
                done = True
            if distributed.all_reduce_max(stop.signal is not None, context):
                save()
                log.warning("stopped at step %d; continue with --resume", step)
                return EXIT_SIGTERM if stop.signal == signal.SIGTERM else EXIT_SIGINT
            if done:
                break
        if done:
            break
        epoch += 1
        position = 0
        if epoch < options.epochs:
            if not options.val_every:
                validate()
            if not options.save_every:
                save()
    validate()
    save()
    if context.is_main:
        log.info("done: %d steps, weights in %s", step, weights_path(options.output))
    return EXIT_OK
