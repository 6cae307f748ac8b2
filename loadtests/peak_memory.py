"""Peak memory per megapixel of one request through the engine (decode -> model -> merge -> encode).

Each image runs in a fresh subprocess; the figure is the growth of the process's peak RSS
(``ru_maxrss``) over its peak after loading the model and serving one small image, divided by the
image's megapixels. Thin and square images of the same pixel count should cost the same::

    python loadtests/peak_memory.py --checkpoints weights/checkpoints 2000x2000 40000x100
    python loadtests/peak_memory.py --tiny 2000x2000 40000x100    # seeded width-8 networks

The networks always run at 256x256, so their width changes the constant, not the per-pixel part.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_one(
    checkpoints: Path, width: int, height: int, detector: Path | None
) -> dict[str, float]:
    """In this process: the peak-RSS growth for one ``width`` x ``height`` PNG request."""
    from PIL import Image

    from models.pipeline import Colorizer
    from service.core.jobs import Job, JobOptions
    from service.engine.batch import BatchEngine

    def job(data: bytes) -> Job:
        now = time.time()
        return Job("m", data, JobOptions(max_instances=8 if detector else 0), now + 600, now)

    def png(w: int, h: int) -> bytes:
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((min(w, 4096), min(h, 4096))).resize((w, h)).save(
            buffer, "PNG", compress_level=1
        )
        return buffer.getvalue()

    colorizer = Colorizer.load(checkpoints, detector)
    engine = BatchEngine(colorizer, ThreadPoolExecutor(1), max_pixels=10**9)
    small, data = png(64, 48), png(width, height)

    async def run() -> float:
        await engine.run_batch([job(small)])
        base = _peak_mb()
        start = time.perf_counter()
        (outcome,) = await engine.run_batch([job(data)])
        assert not isinstance(outcome, Exception), outcome
        return base, time.perf_counter() - start

    base, seconds = asyncio.run(run())
    engine.close()
    megapixels = width * height / 1e6
    growth = _peak_mb() - base
    return {"width": width, "height": height, "megapixels": megapixels, "growth_mb": growth,
            "mb_per_megapixel": growth / megapixels, "seconds": seconds}  # fmt: skip


def measure(checkpoints: Path, size: str, detector: Path | None = None) -> dict[str, float]:
    """``measure_one`` in a fresh interpreter (peak RSS is per process)."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, __file__, "--one", size, "--checkpoints", str(checkpoints)]
    if detector is not None:
        command += ["--detector", str(detector)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("sizes", nargs="+", help="WIDTHxHEIGHT")
    parser.add_argument("--checkpoints", type=Path, help="official checkpoints folder")
    parser.add_argument("--detector", type=Path, help="Mask R-CNN weights (default: no detector)")
    parser.add_argument("--tiny", action="store_true", help="seeded width-8 networks")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.one:
        width, height = (int(v) for v in args.sizes[0].lower().split("x"))
        print(json.dumps(measure_one(args.checkpoints, width, height, args.detector)))
        return 0
    checkpoints = args.checkpoints
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from weight_files import write_official

        checkpoints = write_official(Path(tempfile.mkdtemp()), width=8, seed=0)
    if checkpoints is None:
        parser.error("give --checkpoints or --tiny")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"{'size':>14} {'MP':>6} {'peak growth MB':>15} {'MB per MP':>10} {'s':>6}")
    for size in args.sizes:
        row = measure(checkpoints, size, args.detector)
        print(f"{size:>14} {row['megapixels']:6.2f} {row['growth_mb']:15.0f} "
              f"{row['mb_per_megapixel']:10.1f} {row['seconds']:6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
