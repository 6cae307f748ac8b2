"""``train --model li-dcnn``: Li et al.'s network on a prepare-data manifest, top to bottom.

Initialisation (Li et al. §3.1): with ``--init WEIGHTS_DIR`` the trunk (conv1-conv5), conv6-conv9
and the bin centres are copied from the Zhang ECCV16 file at
``WEIGHTS_DIR/zhang-eccv16/colorization_release_v2-9b330a0b.pth`` (loaded strictly); the layers
ECCV16 lacks are Gaussian: fc1-fc3, the classifier, and the 256 input channels of conv6's first
convolution that carry the tiled fc3 (its 512 conv5 channels are Zhang's, so the initial network
colours as ECCV16 does plus a small term). The paper also initialises the classification branch
from an ImageNet network; no ImageNet network of this branch's shape exists, so it is Gaussian.
Without ``--init`` every layer is Gaussian. "Gaussian" here: weights N(0, 2 / fan_in) (Caffe's
``msra`` filler, the Gaussian that keeps a deep ReLU network's activations in range; the paper
gives no standard deviation), biases 0, BatchNorm scale 1 and shift 0.

Image labels (the classification targets): from ``--labels FILE`` (CSV lines ``path,label``, the
path as in the manifest, relative to the prepare-data input folder, or absolute; the classes are
the sorted distinct labels), otherwise derived from the detector by this rule: the COCO class of
the highest-scoring box prepare-data kept (score >= its threshold), and class 0 ("no object") for
an image without a box; 91 classes (torchvision's COCO label space).

The run directory: ``RUN_DIR/weights/li-dcnn/li_dcnn.pth`` (the model's state dict, what
``serve --models li-dcnn --weights-dir RUN_DIR/weights`` loads strictly), ``RUN_DIR/state.pt``
(``--resume``), ``RUN_DIR/classes.json``, ``metrics.jsonl``, ``config.json``, ``curves.png``.
Optimiser: Adam with ECCV16's settings (lr 3e-5, betas 0.9 / 0.99, weight decay 1e-3), Li et al.
state only "Adam".

Under torchrun (``--batch-size`` per process) the gradients are averaged by
DistributedDataParallel, so N processes with batch B step as one with batch N x B; BatchNorm
(ECCV16's trunk, in train mode) is SyncBatchNorm on CUDA, so its statistics are the global batch's
too, while on CPU (gloo) each process normalises with its own batch's statistics (the one
deviation; tests/test_paper_models_ddp.py). Every parameter but the fixed bin centres takes part
in the loss, so DDP needs no unused-parameter search. Validation is sharded: every rank scores
every N-th validation image with rank 0's BatchNorm statistics and the per-image scores are
gathered. Rank 0 alone writes; a SIGINT / SIGTERM reaching any rank stops all at the same step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from models.atomic import write_text_atomic
from models.li_dcnn import (
    DETECTOR_CLASSES,
    LiDCNN,
    grid_bin_centres,
    load_li_dcnn,
    set_bin_centres,
)
from models.registry import get_model
from models.zhang_eccv16 import load_zhang_eccv16
from training import distributed
from training.atomic import save_torch_atomic
from training.data import StageDataset, collate, to_device
from training.li_losses import (
    bin_histogram,
    class_loss,
    colour_loss,
    rebalancing_weights,
    target_bins,
)
from training.loop import (
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    ResumableSampler,
    StopRequest,
    TrainingError,
    _autocast_dtype,
    _ignore_sigint,
    _rng_state,
    _set_rng_state,
)
from training.losses import is_near_grey
from training.manifest import ManifestRow, read_manifest
from training.run_files import (
    load_state,
    plot_curves,
    read_metrics,
    save_state,
    write_config,
    write_metrics,
)
from training.validation import interleave, shard

log = logging.getLogger(__name__)

MODEL_NAME = "li-dcnn"
CLASSES_NAME = "classes.json"
ADAM_BETAS = (0.9, 0.99)
WEIGHT_DECAY = 1e-3
DEFAULT_LR = 3e-5
DEFAULT_EPOCHS = 10
DEFAULT_BATCH = 16
DEFAULT_PRIOR_IMAGES = 1000


@dataclass
class LiTrainOptions:
    """The options of ``train --model li-dcnn`` (see ``service/commands/train.py``)."""

    data: Path
    output: Path
    init: Path | None = None  # a weights dir holding zhang-eccv16/<official file>; None: Gaussian
    labels: Path | None = None
    epochs: int = DEFAULT_EPOCHS
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH
    max_steps: int | None = None
    precision: str = "fp32"
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    workers: int = 0
    prior_images: int = DEFAULT_PRIOR_IMAGES  # 0: the uniform prior (no rebalancing)
    class_weight: float = 1.0
    log_every: int = 10
    save_every: int = 0  # steps between saves; 0 = after every epoch
    val_limit: int | None = None
    progress: bool = True
    divisor: int = 1  # > 1 narrows every layer (tests and quick runs; not the paper)


# -- initialisation --------------------------------------------------------------------------------


def gaussian_init(module: nn.Module, generator: torch.Generator) -> None:
    """Conv and linear weights N(0, 2 / fan_in), biases 0; BatchNorm 1 and 0 (module docstring)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
                if m is getattr(module, "model_out", None):
                    continue  # the bin centres are data, not a layer to initialise
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else (
                    m.weight.shape[0] * m.weight[0, 0].numel()
                )  # fmt: skip
                std = math.sqrt(2.0 / fan_in)
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


def zhang_file(weights_dir: Path) -> Path:
    (path,) = get_model("zhang-eccv16").weight_paths(weights_dir)
    return path


def copy_from_zhang(network: LiDCNN, zhang: nn.Module) -> list[str]:
    """Copy the trunk, conv6-conv9 and the bin centres from ECCV16; returns the keys copied.

    ECCV16 ``model8.6`` (the 1x1 conv to 313) is Li's conv9 (``model9``); conv6's first weight
    gets Zhang's on its first 512 input channels (conv5's) and keeps its own on the fc3 ones.
    """
    source = zhang.state_dict()
    target = network.state_dict()
    copied = []
    with torch.no_grad():
        for key, value in source.items():
            name = key.replace("model8.6.", "model9.")
            if name == "model6.0.weight":
                target[name][:, : value.shape[1]].copy_(value)
            else:
                if target[name].shape != value.shape:
                    raise TrainingError(f"{key}: shape {tuple(value.shape)} does not fit {name}")
                target[name].copy_(value)
            copied.append(name)
    return copied


def initial_network(init: Path | None, num_classes: int, seed: int, divisor: int = 1) -> LiDCNN:
    """The paper's initialisation (module docstring): from ``init``'s Zhang file or Gaussian."""
    if init is not None and divisor != 1:
        raise TrainingError(
            f"--init copies Zhang's full-width layers; leave out --width-divisor {divisor} or --init"
        )
    network = LiDCNN(num_classes, divisor=divisor)
    gaussian_init(network, torch.Generator().manual_seed(seed))
    if init is None:
        set_bin_centres(network, grid_bin_centres())
        return network
    path = zhang_file(init)
    if not path.is_file():
        raise TrainingError(
            f"{path}: no Zhang ECCV16 file; `python -m service fetch-weights --model zhang-eccv16 "
            f"--weights-dir {init}` fetches it, or leave out --init for a Gaussian start"
        )
    copy_from_zhang(network, load_zhang_eccv16(path))
    return network


# -- labels ----------------------------------------------------------------------------------------


def read_labels_file(path: Path) -> dict[str, str]:
    """CSV ``path,label`` per line (a header line ``path,label`` is allowed)."""
    if not path.is_file():
        raise TrainingError(f"{path}: no labels file")
    labels: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or (number == 1 and [c.strip() for c in row] == ["path", "label"]):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise TrainingError(f"{path}:{number}: expected 'path,label', got {row!r}")
            labels[row[0].strip()] = row[1].strip()
    return labels


def coco_class_names() -> list[str]:
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    names = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    assert len(names) == DETECTOR_CLASSES
    names[0] = "no object"
    return names


def image_labels(
    rows: Sequence[ManifestRow], labels_file: Path | None
) -> tuple[list[int], list[str]]:
    """Each row's class index and the class names (module docstring: file, or the detector rule)."""
    if labels_file is not None:
        given = read_labels_file(labels_file)
        names: list[str] = []
        missing = []
        for row in rows:
            label = given.get(row.path, given.get(str(row.file)))
            if label is None:
                missing.append(row.path)
            names.append(label or "")
        if missing:
            raise TrainingError(
                f"{labels_file}: no label for {len(missing)} of {len(rows)} images, e.g. "
                f"{', '.join(missing[:3])}; add lines 'path,label' (paths as in the manifest)"
            )
        classes = sorted(set(names))
        if len(classes) < 2:
            raise TrainingError(f"{labels_file}: needs at least 2 distinct labels, has {classes}")
        index = {c: i for i, c in enumerate(classes)}
        return [index[n] for n in names], classes
    stale = [r.path for r in rows if r.boxes and len(r.labels) != len(r.boxes)]
    if stale:
        raise TrainingError(
            f"{len(stale)} manifest rows have boxes but no detector classes (e.g. {stale[0]}): the "
            "manifest predates class recording; run prepare-data into a new folder, or pass --labels"
        )
    return [r.labels[0] if r.labels else 0 for r in rows], coco_class_names()


class LabelledDataset(Dataset[dict[str, Any]]):
    """The full-image samples of ``training.data`` (grey L in, colour ab target) with a label."""

    def __init__(self, rows: Sequence[ManifestRow], labels: Sequence[int], seed: int) -> None:
        self.images = StageDataset(rows, "full", seed)
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index = key[1] if isinstance(key, tuple) else key
        sample = self.images[key]
        sample["label"] = self.labels[index]
        return sample


def collate_labelled(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate(samples)
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


def training_prior(dataset: LabelledDataset, centres: torch.Tensor, limit: int) -> torch.Tensor:
    """Bin counts over the first ``limit`` training images (their 64x64 subsampled targets)."""
    counts = torch.zeros(centres.shape[0], dtype=torch.float64)
    for i in range(min(limit, len(dataset))):
        ab = dataset[i]["ab"][None]
        counts += bin_histogram(target_bins(ab, centres), centres.shape[0])
    return counts


# -- the loop --------------------------------------------------------------------------------------


def weights_path(run_dir: Path) -> Path:
    (path,) = get_model(MODEL_NAME).weight_paths(run_dir / "weights")
    return path


def _loader(
    dataset: Dataset[dict[str, Any]], batch: int, workers: int, sampler: Any = None
) -> DataLoader[dict[str, Any]]:
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers,
        collate_fn=collate_labelled, drop_last=sampler is not None,
        worker_init_fn=_ignore_sigint if workers else None,
    )  # fmt: skip


def train_li(opts: LiTrainOptions) -> int:
    """Train ``li-dcnn``; 0 done, 130 / 143 stopped by a signal (saved)."""
    context = distributed.init_distributed(opts.device)
    try:
        with StopRequest() as stop:
            return _train(opts, context, stop)
    finally:
        distributed.shutdown(context)


def _train(opts: LiTrainOptions, context: distributed.DistContext, stop: StopRequest) -> int:
    device = context.device
    autocast_dtype = _autocast_dtype(opts.precision, device)  # type: ignore[arg-type]
    run_dir = opts.output
    if not opts.resume and (run_dir / "state.pt").exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume or another --output")
    if opts.resume and not (run_dir / "state.pt").is_file():
        raise TrainingError(f"{run_dir / 'state.pt'}: nothing to resume; leave out --resume")

    rows = read_manifest(opts.data)
    train_rows = [r for r in rows if r.split == "train"]
    val_rows = [r for r in rows if r.split == "val"][: opts.val_limit]
    labels, classes = image_labels([*train_rows, *val_rows], opts.labels)
    train_set = LabelledDataset(train_rows, labels[: len(train_rows)], opts.seed)
    val_set = LabelledDataset(val_rows, labels[len(train_rows) :], opts.seed)
    global_batch = opts.batch_size * context.world_size
    if len(train_set) < global_batch:
        raise TrainingError(
            f"{len(train_set)} training images in {opts.data} but the batch is {opts.batch_size} x "
            f"{context.world_size} processes = {global_batch}; lower --batch-size or add photos"
        )

    torch.manual_seed(opts.seed)
    state: dict[str, Any] | None = None
    if opts.resume:
        state = load_state(run_dir)
        if state.get("model") != MODEL_NAME:
            raise TrainingError(f"{run_dir} is not a {MODEL_NAME} run; resume it with its model")
        if list(state["classes"]) != classes:
            raise TrainingError(f"{run_dir}: the classes changed since the run started")
        if state.get("divisor", 1) != opts.divisor:
            raise TrainingError(
                f"{run_dir} was started with --width-divisor {state.get('divisor', 1)}; resume "
                "it with the same"
            )
    network = (
        LiDCNN(len(classes), divisor=opts.divisor) if state is not None
        else initial_network(opts.init, len(classes), opts.seed, opts.divisor)
    )  # fmt: skip
    centres = network.bin_centres().detach().clone()
    if state is not None:
        network.load_state_dict(state["network"])
        counts = state["prior_counts"]
    else:
        counts = (
            training_prior(train_set, centres, opts.prior_images) if opts.prior_images else None
        )
    weights = rebalancing_weights(counts, centres)
    network.to(device)
    trained = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=opts.lr, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
    step = epoch = position = skipped = 0
    metrics: list[dict[str, Any]] = []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, epoch, position, skipped = (
            state[k] for k in ("step", "epoch", "position", "skipped")
        )
        metrics = [r for r in read_metrics(run_dir) if r["step"] <= step]
        log.info("resuming %s at epoch %d, step %d", run_dir, epoch, step)

    module: nn.Module = network
    if context.distributed:
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        module = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    sampler = ResumableSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
        seed=opts.seed, drop_last=True,
    )  # fmt: skip
    loader = _loader(train_set, opts.batch_size, opts.workers, sampler)

    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CLASSES_NAME, json.dumps(classes, indent=1) + "\n")
        write_config(
            {**asdict(opts), "model": MODEL_NAME, "world_size": context.world_size,
             "global_batch_size": global_batch, "train_images": len(train_set),
             "val_images": len(val_set), "classes": len(classes),
             "trained_parameters": sum(p.numel() for p in trained),
             "prior": "training set" if counts is not None else "uniform (no rebalancing)",
             "device": str(device)},
            run_dir,
        )  # fmt: skip

    def losses(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):  # fmt: skip
            bins_logits, class_logits = _logits(module, batch["l"])
        bins = target_bins(batch["ab"], centres)
        return colour_loss(bins_logits, bins, weights), class_loss(class_logits, batch["label"])

    def save() -> None:
        if context.is_main:
            cpu = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
            save_torch_atomic(cpu, weights_path(run_dir))
            save_state(
                {"model": MODEL_NAME, "network": cpu, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch,
                 "position": position, "step": step, "skipped": skipped,
                 "prior_counts": counts, "classes": classes, "divisor": opts.divisor},
                run_dir,
            )  # fmt: skip
            write_metrics(metrics, run_dir)
        distributed.barrier(context)

    val_shard = shard(val_set, len(val_set), context.rank, context.world_size)

    def validate() -> None:
        """Each rank scores its share with rank 0's BN statistics; the per-image rows are gathered
        in dataset order, so the result is one process's over all the validation images."""
        if not len(val_set):
            return
        distributed.broadcast_buffers(network, context)
        mine = score_li(network, _loader(val_shard, opts.batch_size, 0), centres, weights, device)
        shards: Any = distributed.all_gather_objects(mine, context)
        row = {"split": "val", "step": step, "epoch": epoch,
               **summarize_li(interleave(shards), opts.class_weight)}  # fmt: skip
        metrics.append(row)
        if context.is_main:
            log.info(
                "val step %d: loss %.4f class accuracy %.3f",
                step,
                row["loss"],
                row["class_accuracy"],
            )

    network.train()
    finished = opts.max_steps is not None and step >= opts.max_steps
    window = [time.perf_counter(), 0, 0.0, 0.0, 0]  # start, images, colour, class, steps
    while epoch < opts.epochs and not finished:
        sampler.set_epoch(epoch)
        sampler.skip = position * opts.batch_size
        for cpu_batch in loader:
            position += 1
            if distributed.all_reduce_max(bool(is_near_grey(cpu_batch["ab"]).any()), context):
                skipped += 1
            else:
                batch = to_device(cpu_batch, device)
                colour, klass = losses(batch)
                loss = colour + opts.class_weight * klass
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                window[1] += global_batch
                window[2] += distributed.all_reduce_mean(float(colour.detach()), context)
                window[3] += distributed.all_reduce_mean(float(klass.detach()), context)
                window[4] += 1
                if step % opts.log_every == 0 or step == opts.max_steps:
                    elapsed = time.perf_counter() - window[0]
                    c, k, s = window[2] / window[4], window[3] / window[4], window[4]
                    row = {"step": step, "epoch": epoch, "loss": c + opts.class_weight * k,
                           "colour_loss": c, "class_loss": k, "lr": opts.lr,
                           "images_per_s": window[1] / elapsed if elapsed > 0 else math.nan}  # fmt: skip
                    metrics.append(row)
                    if context.is_main:
                        log.info("step %d epoch %d loss %.4f (colour %.4f, class %.4f) %.3f images/s"
                                 " over %d steps", step, epoch, row["loss"], c, k,
                                 row["images_per_s"], s)  # fmt: skip
                    window = [time.perf_counter(), 0, 0.0, 0.0, 0]
                if opts.save_every and step % opts.save_every == 0:
                    save()
            if opts.max_steps is not None and step >= opts.max_steps:
                finished = True
            if distributed.all_reduce_max(stop.signal is not None, context):
                save()
                log.warning("stopped at step %d; continue with --resume", step)
                return EXIT_SIGTERM if stop.signal == signal.SIGTERM else EXIT_SIGINT
            if finished:
                break
        if finished:
            break
        epoch += 1
        position = 0
        if epoch < opts.epochs:
            validate()
            if not opts.save_every:
                save()
    validate()
    save()
    if context.is_main:
        plot_curves(metrics, run_dir)
        log.info("done: %d steps, weights in %s", step, weights_path(run_dir))
    return EXIT_OK


@torch.no_grad()
def score_li(
    network: LiDCNN,
    batches: Any,
    centres: torch.Tensor,
    weights: torch.Tensor,
    device: torch.device,
) -> list[dict[str, float]]:
    """Per validation image, in order: its colour loss, class loss and whether the class is right
    (the network in eval mode: BatchNorm with its running statistics)."""
    network.eval()
    rows: list[dict[str, float]] = []
    try:
        for cpu_batch in batches:
            batch = to_device(cpu_batch, device)
            bins_logits, class_logits = network.logits(batch["l"])
            bins = target_bins(batch["ab"], centres)
            for i in range(len(batch["label"])):
                label = batch["label"][i : i + 1]
                rows.append({
                    "colour_loss": float(colour_loss(bins_logits[i : i + 1], bins[i : i + 1], weights)),
                    "class_loss": float(class_loss(class_logits[i : i + 1], label)),
                    "correct": float(class_logits[i].argmax() == label[0]),
                })  # fmt: skip
    finally:
        network.train()
    return rows


def summarize_li(rows: Sequence[dict[str, float]], class_weight: float) -> dict[str, Any]:
    """Means over the images: colour and class loss, the weighted loss, the class accuracy."""
    n = len(rows)
    colour = sum(r["colour_loss"] for r in rows) / n
    klass = sum(r["class_loss"] for r in rows) / n
    return {"images": n, "colour_loss": colour, "class_loss": klass,
            "loss": colour + class_weight * klass,
            "class_accuracy": sum(r["correct"] for r in rows) / n}  # fmt: skip


def _logits(module: nn.Module, l_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's two outputs, through DDP's forward when wrapped (gradients averaged)."""
    if isinstance(module, DistributedDataParallel):
        out: tuple[torch.Tensor, torch.Tensor] = module(l_norm, logits_only=True)
        return out
    assert isinstance(module, LiDCNN)
    return module.logits(l_norm)


def load_trained(run_dir: Path, map_location: str = "cpu") -> LiDCNN:
    """The run's weights as ``serve`` loads them (strict)."""
    return load_li_dcnn(weights_path(run_dir), map_location)
