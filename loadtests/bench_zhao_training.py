"""``zhao-pixelated`` training on a small colour set: each loss per step, seconds and FLOPs per step.

The colour set is synthetic (seeded blocks and gradients of random colours, 128 x 128, box
pseudo-labels on one block) unless ``--data`` names a prepare-data folder. FLOPs per step are
counted by ``torch.utils.flop_counter`` on one forward + backward (the GPU estimate in the docs
divides them by an assumed sustained throughput)::

    python loadtests/bench_zhao_training.py --steps 30 --divisor 4
    python loadtests/bench_zhao_training.py --steps 3 --batch-size 8      # the paper's size
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.zhao_pixelated import ZhaoPixelated
from training.manifest import MANIFEST_NAME, ManifestRow, append_jsonl, read_manifest, row_dict
from training.zhao_pixelated import ADAM_BETAS, LEARNING_RATE, ZhaoDataset, zhao_losses


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def colour_set(root: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    photos, data = root / "photos", root / "data"
    photos.mkdir()
    data.mkdir()
    rows = []
    ramp = np.linspace(0.3, 1.0, 128)[None, :, None]
    for i in range(count):
        pixels = np.empty((128, 128, 3))
        pixels[:, :64] = rng.integers(0, 255, 3) * ramp[:, :64]
        pixels[:, 64:] = rng.integers(0, 255, 3) * ramp[:, 64:]
        Image.fromarray(pixels.astype(np.uint8)).save(photos / f"c{i}.png")
        rows.append(
            ManifestRow(str(photos), f"c{i}.png", 128, 128, [[0, 0, 64, 128]], [1], "train")
        )
    append_jsonl(data / MANIFEST_NAME, [row_dict(r) for r in rows])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a prepare-data folder (default: synthetic)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--divisor", type=int, default=1, help="narrow Tables 1-2 by this factor")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or colour_set(Path(tmp), args.images)
        rows = [r for r in read_manifest(data) if r.split == "train"]
        dataset = ZhaoDataset(rows, None)
        items = [dataset[i] for i in range(len(dataset))]
    model = ZhaoPixelated(classes=2, divisor=args.divisor)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=ADAM_BETAS)
    params = sum(p.numel() for p in model.parameters())
    print(f"CPU: {cpu_name()}; {args.threads} threads; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"model: divisor {args.divisor}, {params / 1e6:.1f} M parameters; batch "
          f"{args.batch_size}; {len(items)} images")  # fmt: skip
    print("| step | loss | L_emb | L_seg | L_gen | s/step |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    flops = 0
    for step in range(1, args.steps + 1):
        chosen = rng.choice(len(items), args.batch_size, replace=False)
        batch = {k: torch.stack([items[i][k] for i in chosen]) for k in items[0]}
        start = time.perf_counter()
        counter = FlopCounterMode(display=False) if step == 1 else None
        if counter is not None:
            counter.__enter__()
        losses = zhao_losses(model, batch)
        optimiser.zero_grad(set_to_none=True)
        losses.total.backward()
        if counter is not None:
            counter.__exit__(None, None, None)
            flops = counter.get_total_flops()
        optimiser.step()
        seconds = time.perf_counter() - start
        f = losses.as_floats()
        print(f"| {step} | {f['loss']:.3f} | {f['loss_emb']:.3f} | {f['loss_seg']:.4f} | "
              f"{f['loss_gen']:.3f} | {seconds:.2f} |", flush=True)  # fmt: skip
    print(f"FLOPs per step (forward + backward, batch {args.batch_size}): {flops / 1e12:.3f} T "
          f"({flops / args.batch_size / 1e9:.1f} G per image)")  # fmt: skip


if __name__ == "__main__":
    main()
