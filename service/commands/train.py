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
    parser.add_argument("--stage", choices=["full", "instance", "fusion"], required=True)
    parser.add_argument("--data", type=Path, required=True, metavar="DATA_DIR",
                        help="a prepare-data output folder")  # fmt: skip
    parser.add_argument("--init", type=Path, required=True, metavar="WEIGHTS",
                        help="official checkpoint folder, MMagic file or a previous run directory")  # fmt: skip
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
                        help="validate every K steps (default 0: after every epoch)")  # fmt: skip
    parser.add_argument("--save-every", type=non_negative_int, default=0, metavar="K",
                        help="save checkpoints every K steps (default 0: after every epoch)")  # fmt: skip
    parser.add_argument("--val-limit", type=positive_int, metavar="N",
                        help="validate on at most N held-out images")  # fmt: skip
    parser.add_argument("--lpips-weights", type=Path, metavar="FILE",
                        help="torchvision VGG16 weights: adds LPIPS to validation")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.checkpoints import CheckpointError
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
