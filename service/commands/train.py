"""``train``: one of the paper's three stages (full, instance, fusion) on a prepared manifest.

The work is in ``training.loop``. Under ``torchrun --nproc-per-node N -m service train ...`` each
process trains on its share (``--batch-size`` is per process). Exit codes: 0 done; 2 usage or
data error; 130 / 143 stopped by SIGINT / SIGTERM after saving (continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.commands.arg_types import non_negative_int, positive_float, positive_int

EXIT_USAGE = 2


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="train one stage (full, instance, fusion) of the colorization networks",
        description="Fine-tune the networks on a prepare-data manifest, one stage of the paper at "
        "a time. Defaults are the reference's per stage: full and instance lr 5e-4, 100 + 50 "
        "epochs, batch 16, BatchNorm in train mode; fusion lr 5e-5, 10 + 20 epochs, batch 1, only "
        "the weight generators and GF's last layers trained. RUN_DIR/checkpoints/ then serves "
        "with `serve --checkpoints RUN_DIR/checkpoints`. Exit code 0: done; 2: usage or data "
        "error; 130/143: stopped by SIGINT/SIGTERM (saved; continue with --resume).",
    )
    parser.add_argument("--model", choices=["instcolor", "li-dcnn", "zhao-pixelated"],
                        default="instcolor",
                        help="instcolor (default: one --stage of InstColorization), li-dcnn "
                        "(Li et al., docs/li-dcnn.md) or zhao-pixelated (Zhao et al., trained from "
                        "scratch, docs/zhao-pixelated.md); weights to RUN_DIR/weights/<model>/")  # fmt: skip
    parser.add_argument("--stage", choices=["full", "instance", "fusion"],
                        help="instcolor: the stage to train (required for instcolor)")  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, metavar="DATA_DIR",
                        help="a prepare-data output folder")  # fmt: skip
    parser.add_argument("--init", type=Path, metavar="WEIGHTS",
                        help="instcolor (required): official checkpoint folder, MMagic file or a "
                        "previous run directory; li-dcnn: a weights dir holding "
                        "zhang-eccv16/<official file> (left out: Gaussian init of every layer)")  # fmt: skip
    parser.add_argument("--labels", type=Path, metavar="CSV_OR_DIR",
                        help="li-dcnn: a CSV of 'path,label' lines giving each image's class "
                        "(default: the class of the detector's best box, 0 without a box); "
                        "zhao-pixelated: a folder of COCO-Stuff-style label maps (LABELS_DIR/<photo "
                        "path as .png>, class ids, 255 ignored; default: pseudo-labels from the "
                        "manifest's detector boxes)")  # fmt: skip
    parser.add_argument("--prior-images", type=non_negative_int, default=1000, metavar="N",
                        help="li-dcnn: training images the colour prior of the rebalancing is "
                        "counted on (default 1000; 0: uniform prior, no rebalancing)")  # fmt: skip
    parser.add_argument("--class-weight", type=positive_float, default=1.0, metavar="W",
                        help="li-dcnn: weight of the classification loss (default 1, the paper)")  # fmt: skip
    parser.add_argument("--classes", type=positive_int,
                        help="zhao-pixelated: segmentation classes (default 183 with --labels, "
                        "2 with box pseudo-labels)")  # fmt: skip
    parser.add_argument("--width-divisor", type=positive_int, default=1, metavar="D",
                        help="li-dcnn, zhao-pixelated: narrow every layer by D (tests and quick "
                        "runs, not the paper; default 1); serving reads it from the weights")  # fmt: skip
    parser.add_argument("--generator-layers", type=positive_int, metavar="N",
                        help="zhao-pixelated: gated layers of the PixelCNN generator (default 8)")  # fmt: skip
    parser.add_argument("--generator-channels", type=positive_int, metavar="C",
                        help="zhao-pixelated: the generator's channels (default 128)")  # fmt: skip
    parser.add_argument("--output", type=Path, required=True, metavar="RUN_DIR")
    parser.add_argument("--epochs", type=non_negative_int,
                        help="epochs at the full learning rate (niter; default per stage)")  # fmt: skip
    parser.add_argument("--decay-epochs", type=non_negative_int,
                        help="epochs of linear decay to ~0 (niter_decay; default per stage)")  # fmt: skip
    parser.add_argument("--lr", type=positive_float, help="Adam learning rate (default per stage)")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per step per process (default per stage)")  # fmt: skip
    parser.add_argument("--max-steps", type=positive_int, metavar="K",
                        help="stop after K optimiser steps in all (a short run, a benchmark)")  # fmt: skip
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="fp32 (default); bf16 autocast (CUDA, CPU); fp16 autocast with "
                        "gradient scaling (CUDA only)")  # fmt: skip
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present), cpu, cuda; under torchrun each process "
                        "takes cuda:LOCAL_RANK")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in RUN_DIR from its state.pt")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of order, boxes, init (default 0)"
    )
    parser.add_argument("--workers", type=non_negative_int,
                        help="data-loading processes per training process (default min(8, CPUs "
                        "/ processes on this machine); 0 loads in the training process)")  # fmt: skip
    parser.add_argument("--prefetch-factor", type=positive_int, default=4, metavar="N",
                        help="batches each worker loads ahead (default 4)")  # fmt: skip
    parser.add_argument("--no-persistent-workers", action="store_true",
                        help="start the data-loading workers again every epoch")  # fmt: skip
    on_cuda = argparse.BooleanOptionalAction
    parser.add_argument("--pin-memory", action=on_cuda,
                        help="page-locked batches for asynchronous copies (default: on CUDA)")  # fmt: skip
    parser.add_argument("--channels-last", action=on_cuda,
                        help="NHWC memory format for the networks (default: on CUDA)")  # fmt: skip
    parser.add_argument("--cudnn-benchmark", action=on_cuda,
                        help="let cuDNN tune each convolution for the fixed 256x256 inputs "
                        "(default: on; CUDA only)")  # fmt: skip
    parser.add_argument("--fresh-fusion", action="store_true",
                        help="fusion stage: GF trunk from the init's GComp and new weight "
                        "generators (the paper) instead of fine-tuning the init's GF")  # fmt: skip
    parser.add_argument("--hint-sample-p", type=float, default=1.0, metavar="P",
                        help="train to follow colour hints: every training input gets random "
                        "ground-truth hints, a geometric number of patches (continue with "
                        "probability 1-P; sides 1-9, the patch's mean ab) as the SIGGRAPH17 "
                        "authors train; 1 (default): no hints, as the released checkpoints; "
                        "the authors used 1/8 (docs/hints.md)")  # fmt: skip
    parser.add_argument("--log-every", type=positive_int, default=10, metavar="K",
                        help="a log line and a metrics.jsonl row every K steps (default 10)")  # fmt: skip
    parser.add_argument("--val-every", type=non_negative_int, default=0, metavar="K",
                        help="instcolor, zhao-pixelated: validate every K steps (default 0: after "
                        "every epoch)")  # fmt: skip
    parser.add_argument("--save-every", type=non_negative_int, default=0, metavar="K",
                        help="save checkpoints every K steps (default 0: after every epoch)")  # fmt: skip
    parser.add_argument("--val-limit", type=positive_int, metavar="N",
                        help="validate on at most N held-out images")  # fmt: skip
    parser.add_argument("--lpips-weights", type=Path, metavar="FILE",
                        help="torchvision VGG16 weights: adds LPIPS to validation")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def refused(args: argparse.Namespace, flags: tuple[tuple[str, Any], ...]) -> bool:
    """Write an error for the first given flag that is not for ``--model``; True if one was."""
    for flag, value in flags:
        if value is not None:
            sys.stderr.write(f"train: error: {flag} is not for --model {args.model}\n")
            return True
    return False


def run_zhao(args: argparse.Namespace) -> int:
    from models.zhao_pixelated import DEFAULT_GENERATOR_CHANNELS, DEFAULT_GENERATOR_LAYERS
    from training.loop import default_workers
    from training.zhao_pixelated import ZhaoTrainingError, ZhaoTrainOptions, train_zhao

    if refused(args, (("--stage", args.stage), ("--init", args.init),
                      ("--decay-epochs", args.decay_epochs), ("--lpips-weights", args.lpips_weights),
                      ("--fresh-fusion", args.fresh_fusion or None),
                      ("--precision", None if args.precision == "fp32" else args.precision))):  # fmt: skip
        return EXIT_USAGE
    options = ZhaoTrainOptions(
        data=args.data, output=args.output, max_steps=args.max_steps,
        epochs=args.epochs if args.epochs is not None else 1,
        batch_size=args.batch_size or 8, lr=args.lr or 1e-3, labels_dir=args.labels,
        classes=args.classes, device=args.device, resume=args.resume, seed=args.seed,
        log_every=args.log_every, save_every=args.save_every,
        workers=default_workers() if args.workers is None else args.workers,
        val_every=args.val_every, val_limit=args.val_limit, divisor=args.width_divisor,
        generator_layers=args.generator_layers or DEFAULT_GENERATOR_LAYERS,
        generator_channels=args.generator_channels or DEFAULT_GENERATOR_CHANNELS,
    )  # fmt: skip
    try:
        return train_zhao(options)
    except (ZhaoTrainingError, FileNotFoundError) as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    if args.model == "li-dcnn":
        return run_li(args)
    if args.model == "zhao-pixelated":
        return run_zhao(args)
    from models.checkpoints import CheckpointError

    if refused(args, (("--width-divisor", None if args.width_divisor == 1 else args.width_divisor),
                      ("--generator-layers", args.generator_layers),
                      ("--generator-channels", args.generator_channels))):  # fmt: skip
        return EXIT_USAGE
    if args.stage is None or args.init is None:
        sys.stderr.write("train: error: --model instcolor needs --stage and --init\n")
        return EXIT_USAGE
    from training.loop import TrainingError, TrainOptions, train

    options = TrainOptions(
        stage=args.stage, data=args.data, init=args.init, output=args.output,
        epochs=args.epochs, decay_epochs=args.decay_epochs, lr=args.lr,
        batch_size=args.batch_size, max_steps=args.max_steps, precision=args.precision,
        device=args.device, resume=args.resume, seed=args.seed, workers=args.workers,
        prefetch_factor=args.prefetch_factor, persistent_workers=not args.no_persistent_workers,
        pin_memory=args.pin_memory, channels_last=args.channels_last,
        cudnn_benchmark=args.cudnn_benchmark,
        fresh_fusion=args.fresh_fusion, hint_sample_p=args.hint_sample_p, log_every=args.log_every, val_every=args.val_every,
        save_every=args.save_every, val_limit=args.val_limit,
        lpips_weights=args.lpips_weights, progress=not args.no_progress,
    )  # fmt: skip
    try:
        return train(options)
    except (TrainingError, CheckpointError, FileNotFoundError) as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE


def run_li(args: argparse.Namespace) -> int:
    """``--model li-dcnn``: ``training.li_dcnn``; the InstColorization-only flags are refused."""
    from models.checkpoints import CheckpointError
    from training.li_dcnn import DEFAULT_BATCH, DEFAULT_EPOCHS, DEFAULT_LR, LiTrainOptions, train_li
    from training.loop import TrainingError, default_workers

    if refused(args, (("--stage", args.stage), ("--decay-epochs", args.decay_epochs),
                      ("--lpips-weights", args.lpips_weights), ("--val-every", args.val_every or None),
                      ("--fresh-fusion", args.fresh_fusion or None),
                      ("--generator-layers", args.generator_layers),
                      ("--generator-channels", args.generator_channels))):  # fmt: skip
        return EXIT_USAGE
    options = LiTrainOptions(
        data=args.data, output=args.output, init=args.init, labels=args.labels,
        epochs=DEFAULT_EPOCHS if args.epochs is None else args.epochs,
        lr=DEFAULT_LR if args.lr is None else args.lr,
        batch_size=DEFAULT_BATCH if args.batch_size is None else args.batch_size,
        max_steps=args.max_steps, precision=args.precision, device=args.device,
        resume=args.resume, seed=args.seed,
        workers=default_workers() if args.workers is None else args.workers,
        prior_images=args.prior_images, class_weight=args.class_weight,
        log_every=args.log_every, save_every=args.save_every, val_limit=args.val_limit,
        progress=not args.no_progress, divisor=args.width_divisor,
    )  # fmt: skip
    try:
        return train_li(options)
    except (TrainingError, CheckpointError, FileNotFoundError) as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE
