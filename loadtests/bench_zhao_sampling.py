"""Cost per sample of ``zhao-pixelated``: conditioning, incremental sampling, and the naive form.

Seeded random weights of the registry's default configuration (the cost does not depend on the
values). For each (images, samples) it times ``condition`` (f and h, once per image) and
``sample_ab`` (the incremental raster loop over the 32 x 32 ab grid), and, for comparison, one
parallel generator pass, which the naive sampler would repeat for each of the 1024 pixels::

    python loadtests/bench_zhao_sampling.py
    python loadtests/bench_zhao_sampling.py --configs 1x1,1x4,4x4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.zhao_pixelated import ZhaoPixelated, sample_ab


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1x1,1x4,2x4", help="IMAGESxSAMPLES, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = ZhaoPixelated().eval().to(device)
    name = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"device: {name}; {args.threads} threads; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| images x samples | condition (s) | sampling (s) | s per sample | naive est. (s) |")
    print("|---|---|---|---|---|")
    for config in args.configs.split(","):
        images, samples = (int(v) for v in config.split("x"))
        lightness = torch.rand(images, 1, 128, 128, device=device) * 100
        with torch.no_grad():
            start = time.perf_counter()
            cond = model.condition(lightness).condition
            conditioned = time.perf_counter() - start
            batch_cond = cond.repeat_interleave(samples, dim=0)
            ab = torch.zeros(images * samples, 2, 32, 32, device=device)
            start = time.perf_counter()
            model.full_parameters(ab, batch_cond)
            one_pass = time.perf_counter() - start
        start = time.perf_counter()
        sample_ab(model, lightness, list(range(images)), samples)
        total = time.perf_counter() - start
        sampling = total - conditioned  # sample_ab conditions once itself
        per_sample = total / (images * samples)
        naive = conditioned + one_pass * 32 * 32
        print(f"| {images} x {samples} | {conditioned:.2f} | {sampling:.2f} | "
              f"{per_sample:.2f} | {naive:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
