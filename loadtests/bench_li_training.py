"""li-dcnn training on a small colour set: the losses per step, s/step and FLOPs per image.

A benchmark, not a test. Writes ``--images`` synthetic colour photos (smooth gradients with
coloured patches, two classes by a labels file: warm and cool dominant hue), prepares them with
``prepare-data`` (no detector) and runs ``train --model li-dcnn`` through the real loop for
``--steps`` optimiser steps (Gaussian initialisation of every layer, as without ``--init``: no
Zhang weights are available offline; the colour prior counted on the set). It prints each logged
step's total, colour and class loss, the mean s/step after the first step, and the FLOPs of one
training step per 256x256 image (forward + backward, ``torch.utils.flop_counter``), and appends
the figures with the machine to ``BENCHMARKS.md`` (``--output``, ``--no-write``).

    python loadtests/bench_li_training.py                 # CPU: 8 images, batch 2, 12 steps
    python loadtests/bench_li_training.py --steps 200 --batch-size 16 --images 64   # a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import REPO, git_commit, machine
from PIL import Image

from models.li_dcnn import LiDCNN
from service.cli import main as cli
from training.run_files import read_metrics


def photo(index: int, size: int = 160) -> Image.Image:
    """Warm (even index) or cool (odd) photos: a hue gradient plus three coloured patches."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:size, 0:size] / size
    warm = index % 2 == 0
    r = 0.55 + 0.4 * x if warm else 0.15 + 0.2 * y
    g = 0.3 + 0.3 * y
    b = 0.15 + 0.2 * x if warm else 0.55 + 0.4 * x
    image = (np.stack([r, g, b], -1) * 255).astype(np.uint8)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        image[y0 : y0 + 36, x0 : x0 + 36] = rng.integers(0, 256, 3)
    return Image.fromarray(image)


def step_flops(batch: int = 1) -> int:
    """FLOPs of one forward + backward of li-dcnn on ``batch`` 256x256 images."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):  # shapes only: counted, not computed
        network = LiDCNN()
        l_norm = torch.zeros(batch, 1, 256, 256)
    with FlopCounterMode(display=False) as counter:
        bins, classes = network.logits(l_norm)
        (bins.float().mean() + classes.float().mean()).backward()
    return int(counter.get_total_flops())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    started = dt.datetime.now(dt.UTC)
    before = machine(device)
    print(before)
    with tempfile.TemporaryDirectory(prefix="bench-li-") as scratch:
        root = Path(scratch)
        photos = root / "photos"
        photos.mkdir()
        lines = ["path,label"]
        for i in range(args.images):
            photo(i).save(photos / f"p{i:03d}.png")
            lines.append(f"p{i:03d}.png,{'warm' if i % 2 == 0 else 'cool'}")
        (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        data = root / "data"
        assert cli(["prepare-data", str(photos), "--output", str(data), "--no-detector",
                    "--val-fraction", "0", "--no-progress"]) == 0  # fmt: skip
        t0 = time.perf_counter()
        code = cli([
            "train", "--model", "li-dcnn", "--data", str(data), "--output", str(root / "run"),
            "--labels", str(root / "labels.csv"), "--batch-size", str(args.batch_size),
            "--max-steps", str(args.steps), "--epochs", "1000", "--lr", str(args.lr),
            "--log-every", "1", "--device", str(device), "--precision", args.precision,
            "--no-progress",
        ])  # fmt: skip
        wall = time.perf_counter() - t0
        if code != 0:
            print(f"train exited {code}", file=sys.stderr)
            return code
        rows = [r for r in read_metrics(root / "run") if r.get("split") != "val"]
    flops = None if args.no_flops else step_flops()
    seconds = [args.batch_size / r["images_per_s"] for r in rows[1:]]
    s_per_step = statistics.mean(seconds) if seconds else float("nan")
    first = statistics.mean(r["loss"] for r in rows[:3])
    last = statistics.mean(r["loss"] for r in rows[-3:])
    table = ["| step | loss | colour loss | class loss | s/step |", "|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['step']} | {r['loss']:.1f} | {r['colour_loss']:.1f} | {r['class_loss']:.3f} "
            f"| {args.batch_size / r['images_per_s']:.1f} |"
        )
    summary = [
        f"## li-dcnn training, {started:%Y-%m-%d %H:%M} UTC, {device.type}",
        "",
        f"- Machine: {before}",
        f"- At the end: {machine(device).rsplit('; ', 1)[-1]}",
        f"- Set: {args.images} synthetic {photo(0).size[0]}px colour photos (warm / cool labels "
        f"file), Gaussian init, batch {args.batch_size}, Adam lr {args.lr}, {args.precision}; "
        f"commit {git_commit()}",
        "- Command: `python loadtests/bench_li_training.py "
        + " ".join(a for a in (argv or sys.argv[1:]))
        + "`",
        f"- Loss (colour summed over the 64x64 grid + class): mean of the first 3 steps "
        f"{first:.1f}, of the last 3 {last:.1f} ({'decreasing' if last < first else 'NOT decreasing'})",
        f"- Mean s/step after the first: {s_per_step:.1f} ({s_per_step / args.batch_size:.1f} s "
        f"per image); train command wall {wall:.0f} s",
    ]
    if flops is not None:
        summary.append(
            f"- FLOPs of one training step (forward + backward) per 256x256 image: "
            f"{flops / 1e9:.0f} GFLOP"
        )
    text = "\n".join([*summary, "", *table, ""])
    print(text)
    if not args.no_write:
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
