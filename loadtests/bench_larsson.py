"""Larsson ECCV16 on this machine: time and peak memory per image of ``predict_ab`` (fp32, CPU).

Seeded random weights (the official file is not on the development machine; the cost does not
depend on the values). Run: ``python loadtests/bench_larsson.py [--runs 3] [--threads N]``.
Prints the machine (from /proc/cpuinfo), the load's and the forward's peak RSS and the times.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from models.larsson_eccv16 import INPUT_SIZE, LarssonECCV16


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = names[0] if names else platform.processor()
    return f"{len(names)} logical CPUs, {cpu}, {' '.join(isa)}, {gpu}"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch {torch.__version__}; threads {args.threads}")
    before = peak_mb()
    torch.manual_seed(0)
    model = LarssonECCV16().eval().requires_grad_(False)
    loaded = peak_mb()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"parameters {params:,}; peak RSS after building: {loaded:.0f} MB (+{loaded - before:.0f})"
    )
    lightness = torch.rand(1, 1, INPUT_SIZE, INPUT_SIZE) * 100
    times = []
    with torch.inference_mode():
        for _ in range(args.runs):
            start = time.perf_counter()
            model.predict_ab(lightness)
            times.append(time.perf_counter() - start)
    print(
        f"predict_ab 1 x {INPUT_SIZE}x{INPUT_SIZE} (network 512x512), fp32: "
        f"first {times[0]:.2f} s, best {min(times):.2f} s over {args.runs} runs; "
        f"peak RSS {peak_mb():.0f} MB (+{peak_mb() - loaded:.0f} over the built model)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
