"""Pipeline throughput benchmark: images/s of ``Colorizer.colorize`` by batch size and precision.

A benchmark, not a test. For every mode, precision and batch size it colorizes synthetic 640x480
grayscale photos in batches and compares the result with the one-image-at-a-time loop (batch 1):

* ``boxes8``: eight supplied boxes per image (the detector is skipped): the instance-heavy case
  the service allows by default (8 crops through the instance net, fusion at four scales);
* ``detect``: natural detection. With real detector weights (``--detector-weights``) at the
  usual 0.7 threshold; otherwise a randomly initialised Mask R-CNN at ``--score-threshold 0.05``,
  which keeps its top 8 of up to 100 boxes, so the detector and 8 instances both run;
* ``full``: no instances, the full-image network only (what ``--no-detector`` costs).

Weights: real checkpoints with ``--checkpoints`` (official folder or MMagic file); otherwise random
full-width (64) networks are written to a temporary folder in the official layout and loaded by the
real loader (same compute as the authors' weights, meaningless colours).

fp16 is measured only where CUDA exists. Figures go to stdout as a Markdown table, and are appended
with the machine (CPU, cores, GPU, torch) to ``BENCHMARKS.md`` (``--output`` to change,
``--no-write`` to skip). Full-width networks on a CPU are slow (tens of seconds per 8-instance
image): ``--quick`` measures batch sizes 1 and 2, one batch each, in a few minutes.

    python loadtests/bench_pipeline.py --quick                         # CPU dev box
    python loadtests/bench_pipeline.py --checkpoints weights/checkpoints \\
        --detector-weights weights/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth   # GPU, real weights
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.boxes import Detections
from models.checkpoints import load_networks
from models.detector import BoxDetector, build_maskrcnn
from models.pipeline import ColorizeOptions, Colorizer
from models.precision import Precision

MODES = ("full", "boxes8", "detect")
IMAGE_SIZE = (640, 480)
RANDOM_DETECTOR_THRESHOLD = 0.05
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    mode: str
    precision: str
    batch: int
    images: int
    seconds: float
    predict: float  # seconds in Colorizer.predict (detect + instance + fusion), summed
    host: float  # seconds in prepare + merge (CPU), summed
    instances: float  # mean instances per image
    peak_mib: float | None

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def photo(index: int) -> Image.Image:
    """A deterministic grayscale 'photo': gradient, noise and a few shapes to detect."""
    rng = np.random.default_rng(index)
    width, height = IMAGE_SIZE
    k = min(width / 640, height / 480)  # shapes scale with --image-size (designed at 640x480)
    base = np.linspace(40, 215, width)[None, :].repeat(height, axis=0)
    base += rng.normal(0, 12, (height, width))
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(image)
    for j in range(6):
        x = int(rng.integers(0, max(1, width - int(160 * k))))
        y = int(rng.integers(0, max(1, height - int(160 * k))))
        shade = int(rng.integers(0, 255))
        if j % 2:
            draw.ellipse((x, y, x + 150 * k, y + 150 * k), fill=shade)
        else:
            draw.rectangle((x, y, x + 120 * k, y + 150 * k), fill=shade)
    return image


def eight_boxes() -> Detections:
    """Eight overlapping boxes, laid out at 640x480 and scaled to ``IMAGE_SIZE``."""
    width, height = IMAGE_SIZE
    sx, sy = width / 640, height / 480
    boxes = [[20 + 70 * j, 30 + 20 * (j % 3), 180 + 55 * j, 440 - 15 * (j % 4)] for j in range(8)]
    return Detections.from_boxes(
        [[min(x1 * sx, width), y1 * sy, min(x2 * sx, width), y2 * sy] for x1, y1, x2, y2 in boxes]
    )


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts.append(
            f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        )
    else:
        parts.append("no GPU used")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    if hasattr(os, "getloadavg"):  # other processes skew CPU figures: record how busy it was
        parts.append("load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    return "; ".join(parts)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def random_checkpoints(folder: Path, width: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from weight_files import write_official

    return write_official(folder, width=width, seed=0)


def measure(
    colorizer: Colorizer,
    mode: str,
    batch: int,
    images: int,
    warmup: int,
    threshold: float,
) -> Result:
    if mode == "full":
        options = ColorizeOptions(max_instances=0)
    elif mode == "boxes8":
        options = ColorizeOptions(boxes=eight_boxes())
    else:
        options = ColorizeOptions(score_threshold=threshold)
    rounds = max(1, -(-images // batch))
    # made before the clock starts: drawing a photo costs milliseconds, a GPU batch not many more
    batches = [[photo(r * batch + i) for i in range(batch)] for r in range(rounds)]
    for _ in range(warmup):
        colorizer.colorize(batches[0], options)
    if colorizer.device.type == "cuda":
        torch.cuda.synchronize(colorizer.device)
        torch.cuda.reset_peak_memory_stats(colorizer.device)
    predict = host = 0.0
    instances = 0
    start = time.perf_counter()
    for batch_inputs in batches:
        for result in colorizer.colorize(batch_inputs, options):
            t = result.timings
            host += t["preprocess"] + t["merge"]
            instances += len(result.boxes)
        predict += t["detect"] + t["instance"] + t["fusion"]  # shared by the batch
    seconds = time.perf_counter() - start
    peak = None
    if colorizer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(colorizer.device) / 2**20
    total = rounds * batch
    return Result(
        mode, colorizer.precision, batch, total, seconds, predict, host, instances / total, peak
    )


def table(results: list[Result]) -> str:
    loop = {(r.mode, r.precision): r.rate for r in results if r.batch == 1}
    gpu = any(r.peak_mib is not None for r in results)
    header = [
        "mode",
        "precision",
        "batch",
        "images",
        "seconds",
        "images/s",
        "x loop",
        "predict ms/img",
        "CPU ms/img",
        "instances/img",
    ]
    if gpu:
        header.append("peak GPU MiB")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        base = loop.get((r.mode, r.precision))
        row = [
            r.mode,
            r.precision,
            str(r.batch),
            str(r.images),
            f"{r.seconds:.2f}",
            f"{r.rate:.3f}",
            f"{r.rate / base:.2f}" if base else "-",
            f"{1000 * r.predict / r.images:.0f}",
            f"{1000 * r.host / r.images:.0f}",
            f"{r.instances:.1f}",
        ]
        if gpu:
            row.append(f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoints",
        type=Path,
        help="official folder or MMagic file "
        "(default: random width-64 weights in a temporary folder)",
    )
    parser.add_argument(
        "--detector-weights",
        type=Path,
        help="torchvision Mask R-CNN file (default: random initialisation)",
    )
    parser.add_argument("--detector-version", choices=["v1", "v2"], default="v1")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument(
        "--precisions", default="fp32,fp16", help="fp32, fp16, bf16; fp16 is skipped without CUDA"
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument(
        "--images",
        type=int,
        default=32,
        help="images per measurement (rounded up to whole batches; default 32)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed batches before each measurement (default 2 on CUDA, 0 on CPU)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="detector threshold in detect mode (default 0.7 with real weights, "
        f"{RANDOM_DETECTOR_THRESHOLD} with random ones)",
    )
    parser.add_argument(
        "--width", type=int, default=64, help="width of random networks (64 = official)"
    )
    parser.add_argument(
        "--image-size",
        default="640x480",
        help="WxH of the synthetic photos (default 640x480; e.g. 64x48 for a quick CPU check)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch sizes 1,2 and one batch per measurement (for CPUs)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO / "BENCHMARKS.md",
        help="Markdown file the results are appended to (default BENCHMARKS.md)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.images = "1,2", 1
    return args


def main(argv: list[str] | None = None) -> int:
    global IMAGE_SIZE
    args = parse_args(argv)
    try:
        width, height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--image-size {args.image_size!r}: write WxH, e.g. 64x48") from None
    if width < 16 or height < 16:
        raise SystemExit(f"--image-size {args.image_size}: at least 16x16")
    IMAGE_SIZE = (width, height)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")} | {1})  # 1 = the loop
    wanted = args.precisions.split(",")
    precisions: list[Precision] = [p for p in ("fp32", "fp16", "bf16") if p in wanted]
    if device.type != "cuda":
        precisions = [p for p in precisions if p != "fp16"] or ["fp32"]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)

    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as scratch:
        checkpoints = args.checkpoints
        weights_note = f"checkpoints {checkpoints}"
        if checkpoints is None:
            started = time.perf_counter()
            checkpoints = random_checkpoints(Path(scratch), args.width)
            weights_note = f"random width-{args.width} networks (no real weights)"
            print(
                f"wrote random checkpoints to {checkpoints} in {time.perf_counter() - started:.1f} s"
            )
        detector: BoxDetector | None = None
        threshold = RANDOM_DETECTOR_THRESHOLD
        if "detect" not in modes:
            weights_note += "; no detector (mode detect not measured)"
        elif args.detector_weights is not None:
            detector = BoxDetector.from_file(args.detector_weights, args.detector_version, device)
            threshold = 0.7 if args.score_threshold is None else args.score_threshold
            weights_note += f"; detector {args.detector_weights.name} at threshold {threshold}"
        else:
            torch.manual_seed(0)
            detector = BoxDetector(
                build_maskrcnn(args.detector_version), args.detector_version, device
            )
            threshold = (
                RANDOM_DETECTOR_THRESHOLD if args.score_threshold is None else args.score_threshold
            )
            weights_note += f"; random Mask R-CNN {args.detector_version} at threshold {threshold}"

        machine_before = machine(device)
        print(machine_before)
        print(weights_note)
        results: list[Result] = []
        for precision in precisions:
            # given to the constructor, which turns on the detector's fp16 autocast on CUDA as the
            # service's Colorizer.load does (reset first: the detector is shared by the precisions)
            if detector is not None:
                detector.autocast_dtype = None
            colorizer = Colorizer(load_networks(checkpoints), detector, device, precision)
            # first-call allocations
            colorizer.colorize([photo(0)], ColorizeOptions(max_instances=0))
            for mode in modes:
                for batch in batch_sizes:
                    result = measure(
                        colorizer, mode, batch, max(batch, args.images), warmup, threshold
                    )
                    results.append(result)
                    print(
                        f"{mode:7s} {precision} batch {batch:3d}: {result.rate:8.3f} images/s "
                        f"({result.images} images in {result.seconds:.1f} s, "
                        f"{result.instances:.1f} instances/img)",
                        flush=True,
                    )
            del colorizer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    markdown = table(results)
    print()
    print(markdown)
    command = "python loadtests/bench_pipeline.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    section = (
        f"\n## Pipeline throughput, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {device.type}\n\n"
        f"- Machine: {machine_before}\n"
        f"- At the end: {machine(device).rsplit('; ', 1)[-1]}\n"
        f"- Weights: {weights_note}\n"
        f"- Images: synthetic {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} grayscale, "
        f"--resolution original; commit {git_commit()}\n"
        f"- Command: `{command.strip()}`\n"
        "- images/s is the whole `Colorizer.colorize` (prepare, predict, merge, in sequence); "
        "x loop compares with batch 1 (one image at a time); predict ms/img is the device "
        "stage (detector, instance net, fusion) per image.\n\n"
        f"{markdown}\n"
    )
    if not args.no_write:
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write(section)
        print(f"\nappended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
