"""The training loop, top to bottom: set-up, resume, epochs of steps, logging, validation, saving.

One process per device under torchrun (``--batch-size`` is per process; the global batch is
``batch_size x world_size``); only rank 0 writes. Gradients are averaged by DistributedDataParallel
so N processes with batch B step like one process with batch N x B (exactly where BatchNorm is
frozen, as in stage 3; with BatchNorm in train mode on CUDA it is synchronised across processes,
on CPU each process normalises with its own batch's statistics). Only the parameters a stage
trains require gradients (``training.stages``), so DDP runs with ``find_unused_parameters=False``.
Validation is sharded over the ranks (``training.validation``) so no rank waits on a collective for
the length of a whole validation.
A SIGINT or SIGTERM finishes the current step, saves everything and exits (130 / 143).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from models.precision import Precision
from training import distributed
from training.data import Stage, StageDataset, collate, to_device
from training.losses import colorization_loss, is_near_grey
from training.manifest import read_manifest
from training.run_files import (
    load_init,
    load_state,
    plot_curves,
    read_metrics,
    save_checkpoints,
    save_state,
    write_config,
    write_metrics,
)
from training.stages import ADAM_BETAS, STAGE_DEFAULTS, HintSampler, build_stage, lambda_lr
from training.validation import interleave, score_images, shard, summarize_scores

log = logging.getLogger(__name__)

EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM = 0, 130, 143


class TrainingError(RuntimeError):
    """A configuration or data problem found before training; the message says how to fix it."""


@dataclass
class TrainOptions:
    """Every option of ``python -m service train``; ``None`` means the stage's reference default."""

    stage: Stage
    data: Path
    init: Path
    output: Path
    epochs: int | None = None
    decay_epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    precision: Precision = "fp32"
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    workers: int | None = (
        None  # data-loading processes per training process; None: default_workers()
    )
    prefetch_factor: int = 4  # batches each worker loads ahead (with workers > 0)
    persistent_workers: bool = True  # keep the workers between epochs (with workers > 0)
    pin_memory: bool | None = None  # page-locked batches for asynchronous copies; None: on CUDA
    channels_last: bool | None = None  # NHWC parameters and activations; None: on CUDA
    cudnn_benchmark: bool | None = None  # tune convolutions for the fixed 256x256; None: on CUDA
    fresh_fusion: bool = False
    hint_sample_p: float = 1.0  # < 1: random ground-truth hints while training (1: none)
    log_every: int = 10
    val_every: int = 0  # steps between validations; 0 = at the end of every epoch
    save_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch
    val_limit: int | None = None  # at most this many validation images
    lpips_weights: Path | None = None
    progress: bool = True

    def resolved(self) -> TrainOptions:
        defaults = STAGE_DEFAULTS[self.stage]
        return TrainOptions(**{
            **asdict(self),
            "epochs": defaults.epochs if self.epochs is None else self.epochs,
            "decay_epochs": defaults.decay_epochs if self.decay_epochs is None else self.decay_epochs,
            "lr": defaults.lr if self.lr is None else self.lr,
            "batch_size": defaults.batch_size if self.batch_size is None else self.batch_size,
            "workers": default_workers() if self.workers is None else self.workers,
        })  # fmt: skip


def default_workers() -> int:
    """min(8, this process's share of the CPUs): the CPUs it may run on over the local ranks.

    One 256x256 sample costs a worker a few ms (decode, squash, Lab; crops for stages 2 and 3),
    so 8 workers keep a GPU step of batch 16 fed; more only compete with the other ranks.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, max(1, cpus // local_ranks))


def make_loader(
    dataset: Dataset[dict[str, Any]],
    batch_size: int,
    opts: TrainOptions,
    device: torch.device,
    sampler: DistributedSampler[Any] | None = None,
    *,
    persistent: bool = True,
) -> DataLoader[dict[str, Any]]:
    """A DataLoader with the options' workers, prefetching, pinning (training and validation)."""
    workers = default_workers() if opts.workers is None else opts.workers
    pin = device.type == "cuda" if opts.pin_memory is None else opts.pin_memory
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate, drop_last=sampler is not None, pin_memory=pin,
        worker_init_fn=_ignore_sigint if workers else None,
        prefetch_factor=opts.prefetch_factor if workers else None,
        persistent_workers=persistent and opts.persistent_workers and workers > 0,
    )  # fmt: skip


class StopRequest:
    """Records SIGINT/SIGTERM; the loop stops after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("signal %d: stopping after this step and saving", signum)

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _ignore_sigint(_worker_id: int) -> None:
    """Data-loading workers leave Ctrl-C to the main process, which saves before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ResumableSampler(DistributedSampler[Any]):
    """The distributed sampler's epoch permutation, minus the samples already consumed.

    It yields ``(epoch, index)``: the epoch travels with each index to the workers, which keep
    their own copy of the dataset (persistent workers never see ``StageDataset.set_epoch``).
    """

    skip = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.skip :]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.skip)


@dataclass
class Progress:
    epoch: int = 0
    position: int = 0  # batches of this epoch already consumed (stepped or skipped)
    step: int = 0  # optimiser steps
    skipped: int = 0  # near-grey batches
    metrics: list[dict[str, Any]] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_hint_rng(
    hints: HintSampler | None, saved: list[Any] | None, context: distributed.DistContext
) -> None:
    """This rank's hint generator as saved; a run saved before this was stored (or by another
    number of processes) keeps the fresh ``--seed`` + rank stream, with a warning."""
    if hints is None:
        return
    if saved is None or len(saved) != context.world_size or saved[context.rank] is None:
        log.warning("state.pt holds no hint generator state for this rank: new hints from here")
        return
    hints.generator.set_state(saved[context.rank])


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.float16
    return torch.bfloat16 if precision == "bf16" else None


def train(options: TrainOptions) -> int:
    """Run one stage; returns the exit code (0 done, 130/143 stopped by a signal, saved)."""
    opts = options.resolved()
    assert opts.epochs is not None
    assert opts.decay_epochs is not None
    assert opts.lr is not None
    assert opts.batch_size is not None
    context = distributed.init_distributed(opts.device)
    try:
        with StopRequest() as stop:
            return _train(opts, context, stop)
    finally:
        distributed.shutdown(context)


def _train(opts: TrainOptions, context: distributed.DistContext, stop: StopRequest) -> int:
    assert opts.epochs is not None
    assert opts.decay_epochs is not None
    assert opts.lr is not None
    assert opts.batch_size is not None
    device = context.device
    autocast_dtype = _autocast_dtype(opts.precision, device)
    channels_last = device.type == "cuda" if opts.channels_last is None else opts.channels_last
    if device.type == "cuda":  # every training input is 256x256: one tuning run per shape
        torch.backends.cudnn.benchmark = (
            True if opts.cudnn_benchmark is None else opts.cudnn_benchmark
        )
    run_dir = opts.output
    if not opts.resume and (run_dir / "state.pt").exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume or another --output")
    if opts.resume and not (run_dir / "state.pt").is_file():
        raise TrainingError(f"{run_dir / 'state.pt'}: nothing to resume; leave out --resume")

    rows = read_manifest(opts.data)
    if not 0.0 < opts.hint_sample_p <= 1.0:
        raise TrainingError(f"--hint-sample-p must be in (0, 1], got {opts.hint_sample_p}")
    hinted = opts.hint_sample_p < 1.0
    train_set = StageDataset(
        [r for r in rows if r.split == "train"], opts.stage, opts.seed, crop_targets=hinted
    )
    val_rows = [r for r in rows if r.split == "val"][: opts.val_limit]
    val_set = StageDataset(val_rows, opts.stage, opts.seed)
    global_batch = opts.batch_size * context.world_size
    if len(train_set) < global_batch:
        what = "images" if opts.stage == "full" else "images with boxes"
        raise TrainingError(
            f"{len(train_set)} training {what} in {opts.data} but the batch is {opts.batch_size} x "
            f"{context.world_size} processes = {global_batch}; lower --batch-size or add photos"
        )

    torch.manual_seed(opts.seed)
    init, init_stage = load_init(opts.init)
    model = build_stage(
        opts.stage, init, init_stage=init_stage, fresh_fusion=opts.fresh_fusion,
        seed=opts.seed, hint_sample_p=opts.hint_sample_p, hint_seed=opts.seed + context.rank,
    )  # fmt: skip
    model.module.to(device)
    for net in (model.networks.instance, model.networks.fusion, model.networks.full_image):
        net.to(device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters, lr=opts.lr, betas=ADAM_BETAS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda_lr(opts.epochs, opts.decay_epochs)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")

    progress = Progress()
    if opts.resume:
        state = load_state(run_dir)
        if state["stage"] != opts.stage:
            raise TrainingError(
                f"{run_dir} is a {state['stage']} run; resume it with --stage {state['stage']}"
            )
        model.module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        _set_hint_rng(model.hints, state.get("hint_rng"), context)
        progress = Progress(state["epoch"], state["position"], state["step"], state["skipped"])
        progress.metrics = [r for r in read_metrics(run_dir) if r["step"] <= progress.step]
        log.info("resuming %s at epoch %d, step %d", run_dir, progress.epoch, progress.step)

    if context.distributed and model.bn_train and device.type == "cuda":
        model.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.module)
    module: torch.nn.Module = model.module
    if context.distributed:
        module = DistributedDataParallel(
            model.module, device_ids=[device.index] if device.type == "cuda" else None
        )

    sampler = ResumableSampler(
        train_set, num_replicas=context.world_size, rank=context.rank, shuffle=True,
        seed=opts.seed, drop_last=True,
    )  # fmt: skip
    loader = make_loader(train_set, opts.batch_size, opts, device, sampler)
    val_shard = shard(val_set, len(val_set), context.rank, context.world_size)
    val_loader = make_loader(val_shard, opts.batch_size, opts, device, persistent=False)
    lpips = None
    if opts.lpips_weights is not None:  # every rank scores its share of the validation set
        from evaluation.metrics import LpipsMetric

        lpips = LpipsMetric.from_vgg16_file(opts.lpips_weights, str(device))

    total_epochs = opts.epochs + opts.decay_epochs
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(
            {**asdict(opts), "world_size": context.world_size, "global_batch_size": global_batch,
             "train_images": len(train_set), "val_images": len(val_set),
             "trained_parameters": sum(p.numel() for p in model.parameters),
             "init_layout": init.layout, "init_stage": init_stage, "device": str(device)},
            run_dir,
        )  # fmt: skip

    def save() -> None:
        # every rank's hint generator (each its own stream), so --resume draws the same hints
        hint_rng = distributed.all_gather_objects(
            None if model.hints is None else model.hints.generator.get_state(), context
        )
        if context.is_main:
            save_checkpoints(model.networks, run_dir, opts.hint_sample_p)
            save_state(
                {"stage": opts.stage, "module": model.module.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "rng": _rng_state(), "hint_rng": hint_rng, "epoch": progress.epoch,
                 "position": progress.position, "step": progress.step, "skipped": progress.skipped},
                run_dir,
            )  # fmt: skip
            write_metrics(progress.metrics, run_dir)
        distributed.barrier(context)

    def run_validation() -> None:
        """Each rank scores its shard with rank 0's BN statistics; rank 0 records the whole."""
        if not len(val_set):
            return
        distributed.broadcast_buffers(model.module, context)
        mine = score_images(model, val_loader, device, autocast_dtype, lpips)
        shards: Any = distributed.all_gather_objects(mine, context)
        result = summarize_scores(interleave(shards))
        result.update(step=progress.step, epoch=progress.epoch)
        progress.metrics.append(result)
        if context.is_main:
            log.info("val step %d: %s", progress.step, _brief(result))

    bar = None
    if context.is_main and opts.progress:
        from tqdm import tqdm

        per_epoch = len(train_set) // global_batch
        bar = tqdm(total=total_epochs * per_epoch, initial=progress.epoch * per_epoch + progress.position,
                   unit="batch", dynamic_ncols=True, desc=f"train {opts.stage}")  # fmt: skip

    model.set_mode(True)
    finished = opts.max_steps is not None and progress.step >= opts.max_steps
    window_start, window_images, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    while progress.epoch < total_epochs and not finished:
        train_set.set_epoch(progress.epoch)
        sampler.set_epoch(progress.epoch)
        sampler.skip = progress.position * opts.batch_size
        for cpu_batch in loader:
            progress.position += 1
            grey = bool(is_near_grey(cpu_batch["ab"]).any())
            if distributed.all_reduce_max(grey, context):  # the reference skips the whole batch
                progress.skipped += 1
            else:
                batch = to_device(cpu_batch, device)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):  # fmt: skip
                    pred = module(batch)
                loss = colorization_loss(pred, batch["ab"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                progress.step += 1
                window_loss += distributed.all_reduce_mean(float(loss.detach()), context)
                window_steps += 1
                window_images += global_batch
                if progress.step % opts.log_every == 0 or progress.step == opts.max_steps:
                    elapsed = time.perf_counter() - window_start
                    row = {"step": progress.step, "epoch": progress.epoch,
                           "loss": window_loss / window_steps, "lr": optimizer.param_groups[0]["lr"],
                           "images_per_s": window_images / elapsed if elapsed > 0 else math.nan}  # fmt: skip
                    progress.metrics.append(row)
                    if context.is_main:
                        log.info("step %d epoch %d loss %.5f lr %.3g %.2f images/s", row["step"],
                                 row["epoch"], row["loss"], row["lr"], row["images_per_s"])  # fmt: skip
                    window_start, window_images, window_loss, window_steps = (
                        time.perf_counter(),
                        0,
                        0.0,
                        0,
                    )
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{float(loss):.4f}", img_s=f"{_rate(bar, global_batch):.1f}"
                    )
                if opts.val_every and progress.step % opts.val_every == 0:
                    run_validation()
                if opts.save_every and progress.step % opts.save_every == 0:
                    save()
            if bar is not None:
                bar.update(1)
            if opts.max_steps is not None and progress.step >= opts.max_steps:
                finished = True
            if distributed.all_reduce_max(stop.signal is not None, context):
                save()
                if bar is not None:
                    bar.close()
                log.warning("stopped at step %d; continue with --resume", progress.step)
                return EXIT_SIGTERM if stop.signal == signal.SIGTERM else EXIT_SIGINT
            if finished:
                break
        if finished:
            break
        progress.epoch += 1
        progress.position = 0
        with warnings.catch_warnings():  # a resumed run may close an epoch it did not step in
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()
        if progress.epoch < total_epochs:  # the last epoch's validation and save follow below
            if not opts.val_every:
                run_validation()
            if not opts.save_every:
                save()
    if bar is not None:
        bar.close()
    run_validation()
    save()
    if context.is_main:
        plot_curves(progress.metrics, run_dir)
        log.info("done: %d steps, checkpoints in %s", progress.step, run_dir / "checkpoints")
    return EXIT_OK


def _rate(bar: Any, batch: int) -> float:
    rate = bar.format_dict.get("rate")
    return float(rate) * batch if rate else 0.0


def _brief(result: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float) and not k.endswith("ci95")
    )
