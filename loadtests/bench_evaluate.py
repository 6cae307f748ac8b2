"""``evaluate`` throughput benchmark: images/s of ``python -m service evaluate`` on synthetic photos.

A benchmark, not a test. It writes N synthetic 640x480 colour photos and runs the real command
in-process, at the paper's protocol (``--resolution network``), with and without LPIPS, and reports
the command's own figure (``summary.json`` throughput: decode, grey, colorize, save, score; model
loading excluded) and the wall time of the whole command (report page included).

Weights: real checkpoints with ``--checkpoints``; otherwise random full-width (64) networks in the
official layout (the authors' compute, meaningless colours). LPIPS: ``--lpips-weights`` (the real
torchvision VGG16), otherwise a seeded random VGG16 (same compute). The detector is off unless
``--detector-weights`` is given (on a CPU it costs about 10 s per image by itself).

    python loadtests/bench_evaluate.py --images 8                       # CPU dev box
    python loadtests/bench_evaluate.py --images 256 --batch-size 16 \\
        --checkpoints weights/checkpoints --lpips-weights weights/vgg16-397923af.pth \\
        --detector-weights weights/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --precision fp32   # GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from service.cli import main as cli_main  # noqa: E402


def photo(index: int) -> Image.Image:
    """A synthetic 640x480 colour photo: gradients, blocks of colour and noise."""
    rng = np.random.default_rng(index)
    x = np.linspace(0, 1, 640)[None, :, None]
    y = np.linspace(0, 1, 480)[:, None, None]
    image = np.concatenate([220 * x + 0 * y, 200 * y + 0 * x, 160 * (1 - x * y)], axis=2)
    for _ in range(6):
        x1, y1 = rng.integers(0, 560), rng.integers(0, 400)
        image[y1 : y1 + 80, x1 : x1 + 80] = rng.integers(0, 256, 3)
    image = image + rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        parts.append("no GPU")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        parts.append("load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    return "; ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--lpips-weights", type=Path)
    parser.add_argument("--detector-weights", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from weight_files import write_official, write_vgg16

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as scratch:
        root = Path(scratch)
        checkpoints = args.checkpoints or write_official(root / "ck", width=64, seed=0)
        vgg16 = args.lpips_weights or write_vgg16(root / "vgg16-397923af.pth")
        weights = "real checkpoints" if args.checkpoints else "random width-64 networks"
        weights += "; real VGG16" if args.lpips_weights else "; random VGG16 (same compute)"
        photos = root / "photos"
        photos.mkdir()
        for i in range(args.images):
            photo(i).save(photos / f"{i:04d}.png")
        model = ["--checkpoints", str(checkpoints), "--device", args.device,
                 "--precision", args.precision]  # fmt: skip
        if args.detector_weights:
            model += ["--detector-weights", str(args.detector_weights)]
        else:
            model += ["--no-detector"]
        print(machine())
        os.chdir(root)  # no weights/vgg16-397923af.pth here: without the flag, LPIPS is off
        for label, extra in (("LPIPS on", ["--lpips-weights", str(vgg16)]), ("LPIPS off", [])):
            report = root / label.replace(" ", "_")
            started = time.perf_counter()
            code = cli_main(["evaluate", str(photos), "-o", str(report), "--batch-size",
                             str(args.batch_size), "--no-progress", *model, *extra])  # fmt: skip
            wall = time.perf_counter() - started
            if code != 0:
                raise SystemExit(f"evaluate exited with {code}")
            summary = json.loads((report / "summary.json").read_text())
            rows.append((label, summary["images"], summary["throughput"]["images_per_second"],
                         summary["throughput"]["seconds"], wall,
                         summary["model"]["device"], summary["model"]["precision"]))  # fmt: skip
            print(f"{label}: {rows[-1][2]:.3f} images/s")
        os.chdir(REPO)
    machine_after = machine()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"### evaluate throughput, {stamp}",
        "",
        f"- Machine: {machine_after}",
        f"- Weights: {weights}; detector "
        + ("on" if args.detector_weights else "off (--no-detector)"),
        f"- Photos: {args.images} synthetic 640x480 colour PNGs, --resolution network (256x256), "
        f"--batch-size {args.batch_size}",
        f"- Command: `python loadtests/bench_evaluate.py --images {args.images} "
        f"--batch-size {args.batch_size}`",
        "- images/s: the command's own figure (decode, training grey, colorize, save the PNG, "
        "score); wall: the whole command, model loading and report page included.",
        "",
        "| LPIPS | images | images/s | seconds | wall s | device | precision |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]} | {r[6]} |"
          for r in rows),
        "",
    ]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
