"""Accuracy of each precision and memory format against fp32 NCHW on real photos, and the speed of
batch sizes, in one process.

A benchmark, not a test. Photos: skimage's astronaut, coffee, chelsea, rocket and camera and
matplotlib's grace_hopper.jpg (installed with those packages, nothing is downloaded), made
grayscale. Weights: seeded random full-width (64) networks in the official layout, loaded by the
real loader. For each mode it prints the normalised ab difference to fp32 NCHW (mean and max over
all pixels, range [-1, 1]) and the share of 256x256 RGB output pixels with any channel more than
1 and 3 LSB apart, for the full-image network (``full``) and for 8 supplied boxes (``boxes8``,
on the first ``--box-photos`` photos: the slow case).

``--batch-sizes 1,4`` also times ``Colorizer.colorize`` on the photos (8 boxes each) at each batch
size, interleaved, wall and process CPU seconds per image.

    python loadtests/bench_precision.py                       # CPU: fp32 channels_last, bf16
    python loadtests/bench_precision.py --modes fp32-cl,bf16,fp16 --box-photos 6   # GPU
    python loadtests/bench_precision.py --modes fp32-cl --box-photos 0 --batch-sizes 1,2,4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.boxes import Detections
from models.checkpoints import load_networks
from models.pipeline import ColorizeOptions, Colorizer
from models.precision import Precision, probe_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "loadtests"))
sys.path.insert(0, str(REPO / "tests"))
from bench_pipeline import machine  # noqa: E402
from weight_files import write_official  # noqa: E402

MODES: dict[str, tuple[Precision, bool]] = {
    "fp32-cl": ("fp32", True),
    "bf16": ("bf16", True),
    "fp16": ("fp16", True),
    "bf16-nchw": ("bf16", False),
}


def real_photos() -> list[tuple[str, Image.Image]]:
    import matplotlib.cbook
    from skimage import data

    photos = [(name, Image.fromarray(getattr(data, name)()).convert("L"))
              for name in ("astronaut", "coffee", "chelsea", "rocket", "camera")]  # fmt: skip
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.insert(1, ("grace_hopper", Image.open(f).convert("L")))
    return photos


def boxes_for(image: Image.Image) -> Detections:
    """8 overlapping boxes spread over the photo (same layout for every photo, scaled)."""
    w, h = image.size
    fractions = [(0.05 + 0.1 * j, 0.05 + 0.04 * (j % 3), 0.3 + 0.08 * j, 0.9 - 0.03 * (j % 4))
                 for j in range(8)]  # fmt: skip
    return Detections.from_boxes([[x1 * w, y1 * h, x2 * w, y2 * h] for x1, y1, x2, y2 in fractions])


def compare(ab: torch.Tensor, rgb: np.ndarray, ab0: torch.Tensor, rgb0: np.ndarray) -> list[float]:
    d_ab = (ab - ab0).abs()
    d_rgb = np.abs(rgb.astype(np.int16) - rgb0.astype(np.int16)).max(axis=-1)
    return [d_ab.mean().item(), d_ab.max().item(), (d_rgb > 1).mean(), (d_rgb > 3).mean()]


def run_once(
    colorizer: Colorizer, image: Image.Image, options: ColorizeOptions
) -> tuple[torch.Tensor, np.ndarray]:
    prepared = colorizer.prepare(image, options)
    prediction = colorizer.predict([prepared])[0]
    merged = colorizer.merge(prepared, prediction)
    return prediction.ab, np.asarray(merged.image.convert("RGB"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", default="fp32-cl,bf16", help=f"subset of {','.join(MODES)}")
    parser.add_argument("--box-photos", type=int, default=1,
                        help="photos also run with 8 boxes (default 1; slow in bf16 on AVX2)")  # fmt: skip
    parser.add_argument("--batch-sizes", default="", help="e.g. 1,4: time fp32 batch sizes too")
    parser.add_argument("--width", type=int, default=64, help="random network width (64: official)")
    parser.add_argument(
        "--photos", type=int, default=0, help="use only the first N photos (0: all)"
    )
    args = parser.parse_args(argv)
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    print(f"Machine: {machine(torch.device(device))}")
    print(f"CPU bf16 probe: {probe_cpu().describe()}", flush=True)
    photos = real_photos()
    if args.photos:
        photos = photos[: args.photos]
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as scratch:
        weights = write_official(Path(scratch), width=args.width, seed=0)
        baseline = Colorizer(load_networks(weights), None, device, "fp32", channels_last=False)
        cases = [(name, image, "full") for name, image in photos]
        cases += [(name, image, "boxes8") for name, image in photos[: args.box_photos]]
        rows: dict[tuple[str, str], list[list[float]]] = {}
        for mode in [m for m in args.modes.split(",") if m]:
            precision, channels_last = MODES[mode]
            colorizer = Colorizer(load_networks(weights), None, device, precision,
                                  channels_last=channels_last)  # fmt: skip
            for name, image, kind in cases:
                options = ColorizeOptions(resolution="network", max_instances=0)
                if kind == "boxes8":
                    options = ColorizeOptions(resolution="network", boxes=boxes_for(image))
                ab0, rgb0 = run_once(baseline, image, options)
                start = time.process_time()
                ab, rgb = run_once(colorizer, image, options)
                non_finite = int((~torch.isfinite(ab)).sum())
                figures = compare(ab, rgb, ab0, rgb0)
                rows.setdefault((mode, kind), []).append(figures)
                print(f"{mode} {kind} {name}: ab mean {figures[0]:.4f} max {figures[1]:.4f}, "
                      f"RGB >1 LSB {100 * figures[2]:.2f}% >3 LSB {100 * figures[3]:.2f}% "
                      f"non-finite ab {non_finite} (CPU {time.process_time() - start:.1f} s)", flush=True)  # fmt: skip
        print(
            "\n| mode vs fp32 NCHW | case | photos | ab mean | ab max | RGB > 1 LSB | RGB > 3 LSB |"
        )
        print("|---|---|---|---|---|---|---|")
        for (mode, kind), values in rows.items():
            v = np.array(values)
            print(f"| {mode} | {kind} | {len(values)} | {v[:, 0].mean():.4f} | {v[:, 1].max():.4f} "
                  f"| {100 * v[:, 2].mean():.2f}% | {100 * v[:, 3].mean():.2f}% |")  # fmt: skip

        sizes = [int(b) for b in args.batch_sizes.split(",") if b]
        if sizes:
            colorizer = Colorizer(load_networks(weights), None, device, "fp32")
            count = max(sizes)
            images = [image for _, image in photos[:count]]
            options = [ColorizeOptions(resolution="network", boxes=boxes_for(i)) for i in images]
            colorizer.colorize(images[:1], options[:1])
            timings: dict[int, list[tuple[float, float]]] = {b: [] for b in sizes}
            for batch in sizes:  # the same images at every batch size
                wall, cpu = time.perf_counter(), time.process_time()
                for i in range(0, count, batch):
                    colorizer.colorize(images[i : i + batch], options[i : i + batch])
                timings[batch].append(
                    ((time.perf_counter() - wall) / count, (time.process_time() - cpu) / count)
                )
                print(f"batch {batch}: {timings[batch][-1][0]:.2f} s/img wall, "
                      f"{timings[batch][-1][1]:.2f} s/img CPU", flush=True)  # fmt: skip
    print("Load average at the end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
