"""Time and peak memory per image for every registered model (``models.registry.MODELS``).

Each model runs in its own subprocess (so one model's peak RSS does not hide another's) on
seeded random weights in its official file layout (written by ``tests/weight_files.py``; a model
with no random-weight writer there is skipped with a note), fp32, on the CPU, one 640x480 photo
at the model's own input size and the Lab merge at 640x480. ``instcolor`` runs without the
detector (its full-image network; the 8-instance figures are bench_pipeline.py's).

    python loadtests/bench_models.py                 # prints the table and the machine
    python loadtests/bench_models.py --repeats 5 --output BENCHMARKS.md   # appends them

Figures: the median wall time of ``colorize`` over ``--repeats`` runs after one warm-up, the
process's peak RSS (``ru_maxrss``) at the end, and its growth over the peak after loading the
weights (what one image adds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "loadtests"))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_random_weights(name: str, weights_dir: Path) -> None:
    """Seeded random weights for ``name``; ValueError when there is no writer for it."""
    sys.path.insert(0, str(REPO / "tests"))
    from weight_files import write_official, write_zoo_model

    if name == "instcolor":
        write_official(weights_dir / "checkpoints", width=64, seed=0)
    else:
        write_zoo_model(weights_dir, name, seed=0)


def measure_one(name: str, weights_dir: Path, repeats: int) -> dict[str, float]:
    """In this process: load ``name`` and colorize one 640x480 photo ``repeats`` times."""
    import numpy as np
    import torch
    from PIL import Image

    from models.pipeline import ColorizeOptions
    from models.zoo import load_colorizer

    torch.manual_seed(0)
    started = time.perf_counter()
    colorizer = load_colorizer(name, weights_dir, "cpu", "fp32")
    load_s = time.perf_counter() - started
    after_load = _peak_mb()
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (480, 640), dtype=np.uint8)).convert("RGB")
    options = ColorizeOptions(resolution="original")
    colorizer.colorize([photo], options)  # warm-up
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            out = colorizer.colorize([photo], options)
            times.append(time.perf_counter() - started)
    assert out[0].image.size == (640, 480)
    peak = _peak_mb()
    return {"load_s": load_s, "median_s": statistics.median(times), "min_s": min(times),
            "peak_mb": peak, "after_load_mb": after_load, "growth_mb": peak - after_load}  # fmt: skip


def machine() -> str:
    import torch
    from bench_pipeline import machine as describe

    return describe(torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)  # the child's job
    parser.add_argument("--weights-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.weights_dir, args.repeats)))
        return 0

    from models.registry import MODELS

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, spec in MODELS.items():
            weights = Path(scratch) / name
            try:
                write_random_weights(name, weights)
            except (ValueError, ImportError) as exc:
                print(f"{name}: skipped, no random weights can be built ({exc})", flush=True)
                continue
            child = subprocess.run(
                [sys.executable, __file__, "--one", name, "--weights-dir", str(weights),
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=False, env={**os.environ},
            )  # fmt: skip
            if child.returncode != 0:
                print(f"{name}: failed\n{child.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            size = f"{spec.input_size}x{spec.input_size}"
            rows.append(
                f"| `{name}` | {size} | {result['median_s'] * 1000:.0f} | "
                f"{result['min_s'] * 1000:.0f} | {result['after_load_mb']:.0f} | "
                f"{result['peak_mb']:.0f} | {result['growth_mb']:.0f} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join([
        f"Machine: {machine()}. fp32, CPU, random weights in each model's official layout, "
        f"one 640x480 photo, merged at 640x480; median of {args.repeats} after a warm-up.",
        "",
        "| model | input | ms / image (median) | ms (min) | peak RSS after load, MB | "
        "peak RSS, MB | added by the image, MB |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    print(text)
    if args.output:
        with args.output.open("a") as handle:
            handle.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
