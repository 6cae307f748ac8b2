"""Training throughput benchmark: images/s of ``python -m service train`` per stage.

A benchmark, not a test. Writes synthetic 640x480 colour photos with two boxes each into a
manifest, random full-width (64) networks in the official layout (same compute as the authors'
weights), then runs each stage for ``--steps`` optimiser steps through the real training loop
(``training.loop.train``: data loading, forward, loss, backward, Adam) and reports the images/s of
the steps after the first (first-call allocations are left out). Validation and checkpoint writing
are outside the measured steps. Figures go to stdout as a Markdown table, and are appended with the
machine to ``BENCHMARKS.md`` (``--output`` to change, ``--no-write`` to skip).

``--loader-workers 0,2,8`` also measures the data loading alone, per stage: the training loop's
own DataLoader (``training.loop.make_loader``: workers, prefetching, persistent workers) iterated
without any network, images/s after its first batch. That is the rate the loading can feed a GPU
with; with ``--steps 0`` only the loading is measured.

    python loadtests/bench_training.py                       # CPU dev box: batch 2, 3 steps
    python loadtests/bench_training.py --batch-size 16 --steps 20 --precisions fp32,bf16,fp16  # GPU
    python loadtests/bench_training.py --steps 0 --loader-workers 0,1,2 --batch-size 4  # loading
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import REPO, git_commit, machine, random_checkpoints
from PIL import Image

from training.data import StageDataset
from training.loop import ResumableSampler, TrainOptions, make_loader, train
from training.manifest import read_manifest
from training.prepare import prepare_data
from training.run_files import read_metrics

TRAINING_STAGES = ("full", "instance", "fusion")


def photo(index: int, width: int = 640, height: int = 480) -> Image.Image:
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(3 * x + index), np.cos(2 * y), np.sin(x + y + index)], -1) * 0.5 + 0.5
    image = (base * 255).astype(np.uint8)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 120)), int(rng.integers(0, height - 120))
        image[y0 : y0 + 100, x0 : x0 + 110] = rng.integers(0, 256, 3)
    return Image.fromarray(image)


def make_data(folder: Path, count: int) -> Path:
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for i in range(count):
        photo(i).save(photos / f"p{i:03d}.png")
    data = folder / "data"
    prepare_data([photos], data, detector=None, val_fraction=0.0, progress=False)
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["boxes"], row["scores"] = [[40, 30, 300, 400], [320, 100, 620, 460]], [0.99, 0.9]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="network width (64: official)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="steps per stage (first is warm-up)")
    parser.add_argument("--stages", default=",".join(TRAINING_STAGES))
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, fp16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="default: the loop's default")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    parser.add_argument("--loader-workers", default="", help="comma list: loading-only figures")
    parser.add_argument("--loader-batches", type=int, default=8, help="batches per loading run")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def loader_rate(
    data: Path, stage: str, workers: int, batch: int, batches: int, device: torch.device
) -> float:
    """images/s of the training DataLoader alone, after its first batch (workers started)."""
    rows = [r for r in read_manifest(data) if r.split == "train"]
    dataset = StageDataset(rows, stage)  # type: ignore[arg-type]
    opts = TrainOptions(stage=stage, data=data, init=data, output=data, workers=workers)  # type: ignore[arg-type]
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, drop_last=True)
    loader = make_loader(dataset, batch, opts, device, sampler)
    iterator = iter(loader)
    next(iterator)
    t0 = time.perf_counter()
    count = 0
    for _ in range(batches - 1):
        count += len(next(iterator)["l"])
    rate = count / (time.perf_counter() - t0)
    del iterator, loader
    return rate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    precisions = [p for p in args.precisions.split(",") if p]
    if device.type != "cuda":
        precisions = [p for p in precisions if p != "fp16"]
    started = dt.datetime.now(dt.UTC)
    before = machine(device)
    print(before)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        root = Path(scratch)
        checkpoints = random_checkpoints(root / "checkpoints", args.width)
        loader_workers = [int(w) for w in args.loader_workers.split(",") if w]
        data = make_data(
            root, max(args.batch_size * args.steps, args.batch_size * args.loader_batches, 4)
        )
        loading = []
        for stage in args.stages.split(","):
            for workers in loader_workers:
                rate = loader_rate(
                    data, stage, workers, args.batch_size, args.loader_batches, device
                )
                loading.append((stage, workers, rate))
                print(f"loading {stage}, {workers} workers: {rate:.1f} images/s")
        for precision in precisions if args.steps else []:
            for stage in args.stages.split(","):
                run = root / f"run-{stage}-{precision}"
                t0 = time.perf_counter()
                train(
                    TrainOptions(
                        stage=stage,  # type: ignore[arg-type]
                        data=data, init=checkpoints, output=run, batch_size=args.batch_size,
                        max_steps=args.steps, epochs=1000, decay_epochs=0, log_every=1,
                        precision=precision,  # type: ignore[arg-type]
                        device=str(device), workers=args.workers, progress=False,
                        channels_last=args.channels_last,
                        val_every=10**9, save_every=10**9,
                    )
                )  # fmt: skip
                wall = time.perf_counter() - t0
                steps = [r for r in read_metrics(run) if r.get("split") != "val"]
                rates = [r["images_per_s"] for r in steps[1:]] or [steps[0]["images_per_s"]]
                rate = statistics.mean(rates)
                rows.append((stage, precision, args.batch_size, len(steps), rate, wall))
                print(f"{stage} {precision}: {rate:.3f} images/s ({wall:.0f} s with set-up)")
    table = (
        [
            "| stage | precision | batch | steps | images/s (steps 2+) | s/step | run wall s |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {s} | {p} | {b} | {n} | {r:.3f} | {b / r:.2f} | {w:.0f} |"
                for s, p, b, n, r, w in rows
            ),
        ]
        if rows
        else []
    )
    if loading:
        table += [
            "",
            f"Data loading alone (batch {args.batch_size}, {args.loader_batches - 1} batches"
            " after the first, 640x480 PNG photos):",
            "",
            "| stage | workers | images/s | ms per image per worker |",
            "|---|---|---|---|",
            *(f"| {s} | {w} | {r:.1f} | {1000 * max(w, 1) / r:.0f} |" for s, w, r in loading),
        ]
    text = "\n".join(
        [
            "",
            f"## Training throughput, {started:%Y-%m-%d %H:%M} UTC, {device.type}",
            "",
            f"- Machine: {before}",
            f"- At the end: {machine(device).rsplit('; ', 1)[-1]}",
            f"- Networks: random width-{args.width}; synthetic 640x480 colour photos, 2 boxes each;"
            f" commit {git_commit()}",
            f"- Command: `python loadtests/bench_training.py {' '.join(sys.argv[1:])}`",
            "- images/s: optimiser steps (data loading, forward, loss, backward, Adam) after the"
            " first; stage fusion runs G on every crop and GF with the vectorised fusion.",
            "",
            *table,
            "",
        ]
    )
    print(text)
    if not args.no_write:
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
