"""Offline pipeline benchmark: ``colorize`` images/s, the sequential schedule beside the pipeline.

A benchmark, not a test. It writes N synthetic grey photos and runs them through the ``colorize``
command's own path (``service.commands.colorize.process``: decode + prepare, predict, merge +
encode + atomic write) in one process, twice per repeat, alternating:

* ``sequential``: ``PipelinePlan(loaders=1, read_ahead=1, finish_queue=0)``, the runner before
  issue 18 (one batch read ahead on one thread, finish on the caller's thread after each predict);
* ``pipeline``: ``models.offline.default_plan`` (load pool, predict, finish thread overlapped),
  or, where that plan is the sequential one (a CPU device whose torch team has every core),
  ``PipelinePlan(1, 2, 1)`` forced, to show what overlapping costs there.

``--torch-threads N`` sets torch's team first (``torch.set_num_threads``): on a 2-core CPU, 1
leaves a core for the host stages.

Both write the same files (checked: the outputs of the two schedules are byte-compared). Weights:
random full-width (64) instcolor networks in the official layout, no detector (the full-image
network only: the host stages are the largest share there). ``predict s`` is the time spent in
``Colorizer.predict`` (summed); ``host s`` the sequential run's rest (decode, prepare, merge,
encode, write), the most the overlap can hide.

    python loadtests/bench_offline.py --images 16 --batch-size 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from models.checkpoints import load_networks  # noqa: E402
from models.offline import SEQUENTIAL_PLAN, PipelinePlan, default_plan  # noqa: E402
from models.pipeline import ColorizeOptions, Colorizer  # noqa: E402
from service.commands.colorize import InputFile, process  # noqa: E402

SEQUENTIAL = SEQUENTIAL_PLAN
FORCED = PipelinePlan(loaders=1, read_ahead=2, finish_queue=1)


class Timed:
    """The colorizer with ``predict`` timed (summed over the run); everything else passed on."""

    def __init__(self, colorizer: Colorizer) -> None:
        self._colorizer = colorizer
        self.predict_seconds = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._colorizer, name)

    def predict(self, batch: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._colorizer.predict(batch, *args)
        finally:
            with self._lock:
                self.predict_seconds += time.perf_counter() - started


def photo(index: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(index)
    width, height = size
    base = np.linspace(30, 220, width)[None, :].repeat(height, axis=0)
    base += rng.normal(0, 14, (height, width))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="L")


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (
        f"CPU {cpu}, {len(os.sched_getaffinity(0))} usable cores (torch threads "
        f"{torch.get_num_threads()}); {gpu}; torch {torch.__version__}; {load}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", default="1024x768", help="photo size, WIDTHxHEIGHT")
    parser.add_argument("--format", default="png", choices=("png", "jpeg", "webp"))
    parser.add_argument("--width", type=int, default=64, help="random networks' width")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads first")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from weight_files import write_official

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    size = tuple(int(v) for v in args.size.lower().split("x"))
    assert len(size) == 2, "--size is WIDTHxHEIGHT"
    results: dict[str, list[float]] = {"sequential": [], "pipeline": []}
    predict: dict[str, list[float]] = {"sequential": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="bench-offline-") as scratch:
        root = Path(scratch)
        networks = load_networks(write_official(root / "ck", width=args.width, seed=0))
        colorizer = Colorizer(networks, None, args.device, "fp32")
        default = default_plan(colorizer)
        plan = FORCED if default == SEQUENTIAL else default
        sources = []
        for i in range(args.images):
            path = root / "in" / f"{i:04d}.png"
            path.parent.mkdir(exist_ok=True)
            photo(i, (size[0], size[1])).save(path)
            sources.append(path)
        options = ColorizeOptions()

        def jobs(label: str, repeat: int) -> list[InputFile]:
            out = root / f"{label}{repeat}"
            return [InputFile(s, s.name, out / f"{s.stem}.{args.format}") for s in sources]

        def once(label: str, repeat: int, schedule: PipelinePlan) -> None:
            timed = Timed(colorizer)
            started = time.perf_counter()
            summary = process(cast_any(timed), jobs(label, repeat), lambda job: options,
                              batch_size=args.batch_size, image_format=args.format,
                              progress=False, plan=schedule)  # fmt: skip
            seconds = time.perf_counter() - started
            if summary.failures:
                raise SystemExit(f"{label}: {summary.failures}")
            if repeat >= 0:
                results[label].append(seconds)
                predict[label].append(timed.predict_seconds)

        once("warmup", -1, SEQUENTIAL)
        for repeat in range(args.repeats):
            once("sequential", repeat, SEQUENTIAL)
            once("pipeline", repeat, plan)
        for repeat in range(args.repeats):
            for source in sources:
                a = (root / f"sequential{repeat}" / f"{source.stem}.{args.format}").read_bytes()
                b = (root / f"pipeline{repeat}" / f"{source.stem}.{args.format}").read_bytes()
                assert a == b, f"{source.name}: the schedules wrote different bytes"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    best = {label: min(values) for label, values in results.items()}
    rows = []
    for label, values in results.items():
        at = values.index(best[label])
        host = (
            best["sequential"]
            - predict["sequential"][results["sequential"].index(best["sequential"])]
        )
        rows.append(
            f"| {label} | {args.images / best[label]:.2f} | {best[label]:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} | {predict[label][at]:.1f} | "
            + (f"{host:.1f}" if label == "sequential" else "-")
            + " |"
        )
    text = "\n".join(
        [
            f"### Offline pipeline (issue 18): sequential vs overlapped, {stamp}",
            "",
            f"- Machine: {machine()}",
            f"- {args.images} synthetic {size[0]}x{size[1]} grey PNGs, batch {args.batch_size}, "
            f"--format {args.format}, random width-{args.width} instcolor, no detector, "
            f"device {args.device}, fp32; best of {args.repeats} alternating runs",
            f"- default_plan here: {default}; pipeline run with {plan}"
            + (" (forced)" if plan is FORCED else ""),
            "- outputs of the two schedules byte-identical (checked)",
            f"- Command: `python loadtests/bench_offline.py --images {args.images} "
            f"--batch-size {args.batch_size} --size {args.size} --format {args.format} "
            f"--repeats {args.repeats} --width {args.width}"
            + (f" --torch-threads {args.torch_threads}`" if args.torch_threads else "`"),
            "",
            "| schedule | images/s | best s | runs s | predict s | host s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(text)
    if not args.no_write:
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)
    return 0


def cast_any(value: object) -> Any:
    return value


if __name__ == "__main__":
    raise SystemExit(main())
