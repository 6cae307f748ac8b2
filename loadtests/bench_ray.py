"""``colorize --engine ray`` against ``--engine local`` on the same images, side by side.

Each engine runs the real command in a fresh process (``python -m service colorize``), so the Ray
figure includes starting the local Ray and its actors, as a user's run does. Without
``--weights-dir`` it writes tiny seeded random-weight InstColorization checkpoints (the tests'
``tests/weight_files.py``): the figure is then the engines' overhead, not the network's cost.

    python loadtests/bench_ray.py                 # 32 images of 128x96, tiny instcolor
    python loadtests/bench_ray.py --weights-dir weights --model zhang-eccv16 --images 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown CPU"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    extras = [f for f in ("avx2", "avx512_bf16", "amx_tile") if f in flags]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, flags {'+'.join(extras)}, no GPU, load average {load}"


def images(folder: Path, count: int, width: int, height: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 25, (height, width)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"img{i:03d}.png")


def run(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "service", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{argv}: exit {done.returncode}\n{done.stderr[-2000:]}")
    print("   ", done.stdout.strip().splitlines()[-1])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-dir", type=Path, help="default: tiny random weights")
    parser.add_argument("--model", default="instcolor")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("W", "H"))
    parser.add_argument("--batch-size", default="2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = args.weights_dir
        if weights is None:
            sys.path.insert(0, str(ROOT))
            from tests.weight_files import write_official

            weights = work / "weights"
            write_official(weights / "checkpoints", width=8, seed=0)
        images(work / "in", args.images, *args.size)
        common = ["--no-progress", "--no-detector", "--weights-dir", str(weights), "--model",
                  args.model, "--precision", "fp32", "--device", "cpu",
                  "--batch-size", args.batch_size]  # fmt: skip
        print(f"machine: {machine()}")
        print(f"{args.images} images {args.size[0]}x{args.size[1]}, model {args.model}, "
              f"batch {args.batch_size}, weights {'tiny random' if args.weights_dir is None else weights}")  # fmt: skip
        local = run(["colorize", str(work / "in"), "-o", str(work / "local"), *common])
        on_ray = run(["colorize", str(work / "in"), "-o", str(work / "ray"), *common,
                      "--engine", "ray"])  # fmt: skip
        same = all((work / "ray" / p.name).read_bytes() == p.read_bytes()
                   for p in (work / "local").glob("*.png"))  # fmt: skip
        print(f"local engine: {local:.1f} s wall ({args.images / local:.2f} images/s)")
        print(
            f"ray engine:   {on_ray:.1f} s wall ({args.images / on_ray:.2f} images/s), "
            f"including the local Ray's start"
        )
        print(f"ratio ray/local wall time: {on_ray / local:.2f}; outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
