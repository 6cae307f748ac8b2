"""Host time on the device's critical path: each non-network step of ``Colorizer.predict``.

A benchmark, not a test. Everything ``predict`` does on the host between receiving prepared images
and returning predictions, except the networks themselves, is timed step by step with
``perf_counter`` by calling the same functions ``predict`` calls, for 640x480 images with eight
given boxes each (no detector): choosing boxes, cropping/resizing/converting the instances
(``crop_l`` on the colorizer's crop pool, as ``predict`` runs it), building the network inputs,
building the fusion layout (per-box ``box_info`` + ``build_layout``) and copying ab back
(``_collect``). For context, one whole ``predict`` of tiny width-8 networks is timed too
(``--whole-predict``; their compute is small but not zero on a CPU). Printed per step per image at batch 1, 8 and 32,
with the machine named. Issue 18's target: under 2 ms per 8-instance image in total.

    python loadtests/bench_host_path.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import machine, random_checkpoints

from models.boxes import FUSION_SCALES, Detections, box_info, choose_boxes
from models.fusion import build_layout
from models.pipeline import (
    ColorizeOptions,
    Colorizer,
    PreparedImage,
    _BoxLayout,
    _Outputs,
    instance_bucket,
    pad_rows,
)
from models.precision import probe_cpu
from models.preprocess import crop_l, crop_l_on_device

TARGET_MS = 2.0
BATCHES = (1, 8, 32)
STEPS = ("boxes", "crops", "inputs", "layout", "copy_out")


def photo(seed: int) -> Image.Image:
    torch.manual_seed(seed)
    noise = (torch.rand(480, 640) * 255).to(torch.uint8).numpy()
    return Image.fromarray(noise, mode="L").convert("RGB")


def eight_boxes(seed: int) -> Detections:
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for _ in range(8):
        x, y = (
            int(torch.randint(0, 440, (1,), generator=g)),
            int(torch.randint(0, 280, (1,), generator=g)),
        )
        boxes.append([x, y, x + 60 + int(torch.randint(0, 140, (1,), generator=g)), y + 200])
    return Detections.from_boxes(boxes)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def one_run(colorizer: Colorizer, batch: list[PreparedImage], whole: bool) -> dict[str, float]:
    """Seconds of each step for one pass of the whole batch, as ``predict`` ran before issue 18:
    PIL crops on the crop pool, per-box ``box_info`` + ``build_layout``, a synchronisation after
    each step, ab copied per network call."""
    sync = _sync(colorizer.device)
    dtype = colorizer.dtype
    seconds: dict[str, float] = {}
    chosen = {}

    def boxes() -> None:
        for i, p in enumerate(batch):
            assert p.options.boxes is not None
            chosen[i] = choose_boxes(p.options.boxes, *p.source.size, p.options.max_instances)

    seconds["boxes"] = timed(boxes, sync)
    crops: list[torch.Tensor] = []

    def cut() -> None:
        rgb = [p.source.rgb for p in batch]
        parts = colorizer._crop_pool.map(lambda i: crop_l(rgb[i], chosen[i][0]), chosen)
        crops.append(torch.cat(list(parts)))

    seconds["crops"] = timed(cut, sync)

    def inputs() -> None:
        colorizer._network_input(crops[0], dtype)
        colorizer._network_input(torch.stack([p.l_norm for p in batch]), dtype)

    seconds["inputs"] = timed(inputs, sync)

    def layout() -> None:
        infos = [
            [{s: box_info(b, *p.source.size, s) for s in FUSION_SCALES} for b in chosen[i][0]]
            for i, p in enumerate(batch)
        ]
        build_layout(infos, colorizer.device)

    seconds["layout"] = timed(layout, sync)
    out = torch.zeros(len(batch), 2, 256, 256, device=colorizer.device, dtype=dtype)

    def copy_out() -> None:
        if out.dtype != torch.float32:
            (~torch.isfinite(out)).flatten(1).sum(1).cpu().tolist()
        list(out.float().cpu())

    seconds["copy_out"] = timed(copy_out, sync)
    if whole:
        seconds["predict"] = timed(lambda: colorizer.predict(batch), sync)
    return seconds


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class OpCounter(TorchDispatchMode):
    """Counts the aten operations issued (on CUDA each is one kernel launch or a few)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def counted(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """The aten operations ``fn`` issues (``timed``'s signature, so a step can be counted)."""
    with OpCounter() as counter:
        fn()
    return float(counter.count)


def one_run_device(
    colorizer: Colorizer, batch: list[PreparedImage], whole: bool, count: bool = False
) -> dict[str, float]:
    """The same steps as ``predict`` runs them now (device crops, tensor layout, one copy out).

    Host time: each step is timed without waiting for the device, as ``predict`` issues it
    (the device's own time is not on the host's critical path); the copy out, which waits, is
    timed after a synchronisation so it counts only the copy.
    """
    device, dtype = colorizer.device, colorizer.dtype
    sync = _sync(device)
    timed_or_counted = counted if count else timed
    seconds: dict[str, float] = {}
    chosen = {}
    sync()

    def boxes() -> None:
        for i, p in enumerate(batch):
            assert p.options.boxes is not None
            chosen[i] = choose_boxes(p.options.boxes, *p.source.size, p.options.max_instances)

    seconds["boxes"] = timed_or_counted(boxes, lambda: None)
    held: dict[str, object] = {}

    def cut() -> None:
        layout = _BoxLayout.of([chosen[i][0] for i in chosen], [p.source.size for p in batch])
        held["layout"] = layout
        sources = [p.rgb_uint8() for p in batch]
        held["crops"] = crop_l_on_device(sources, layout.boxes, layout.image_index, device)

    seconds["crops"] = timed_or_counted(cut, lambda: None)

    def inputs() -> None:
        crops = held["crops"]
        assert isinstance(crops, torch.Tensor)
        colorizer._network_input(pad_rows(crops, instance_bucket(crops.shape[0])), dtype)
        colorizer._network_input(torch.stack([p.l_norm for p in batch]), dtype)

    seconds["inputs"] = timed_or_counted(inputs, lambda: None)

    def layout() -> None:
        box_layout = held["layout"]
        assert isinstance(box_layout, _BoxLayout)
        box_layout.fusion_layout(device)

    seconds["layout"] = timed_or_counted(layout, lambda: None)
    out = torch.zeros(len(batch), 2, 256, 256, device=device, dtype=dtype)
    sync()

    def copy_out() -> None:
        outputs = _Outputs(len(batch), device)
        outputs.put(range(len(batch)), out)
        outputs.to_host()

    seconds["copy_out"] = timed_or_counted(copy_out, lambda: None)
    if whole:
        seconds["predict"] = timed(lambda: colorizer.predict(batch), sync)
    return seconds


def measure(
    colorizer: Colorizer, batch: list[PreparedImage], repeats: int, whole: bool
) -> dict[str, float]:
    """Median seconds per image of each step over ``repeats`` runs of the whole batch."""
    run = one_run_device if colorizer.device_crops else one_run
    run(colorizer, batch, False)  # first call: allocations, lazy imports
    runs = [run(colorizer, batch, whole) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) / len(batch) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-threads", type=int, default=4)
    parser.add_argument(
        "--path",
        choices=["both", "pil", "device"],
        default="both",
        help="pil: the path before issue 18 (PIL crops, per-box layout, syncs); device: "
        "predict's device path now; both: one after the other in the same run",
    )
    parser.add_argument(
        "--whole-predict", action="store_true", help="also time whole predicts (slow on a CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        from models.checkpoints import load_networks

        networks = load_networks(random_checkpoints(Path(folder), width=8))
    cpu = probe_cpu().describe()
    print(f"machine: {machine(device)}")
    print(f"CPU bf16: {cpu['bf16_instructions'] or 'no AMX, no AVX512-BF16'} ({cpu['capability']})")
    print(f"precision {args.precision}, crop threads {args.crop_threads}, 8 given boxes/image")
    print()
    print("| path | batch | " + " | ".join(STEPS) + " | host total | predict, width-8 nets |")
    print("|---" * (len(STEPS) + 4) + "|")
    paths = {"both": ["pil", "device"], "pil": ["pil"], "device": ["device"]}[args.path]
    for path in paths:
        colorizer = Colorizer(
            networks,
            device=device,
            precision=args.precision,
            crop_threads=args.crop_threads,
            device_crops=path == "device",
        )
        for size in BATCHES:
            options = [
                ColorizeOptions(resolution="network", boxes=eight_boxes(i)) for i in range(size)
            ]
            batch = [colorizer.prepare(photo(i), options[i]) for i in range(size)]
            ms = {
                k: v * 1e3
                for k, v in measure(colorizer, batch, args.repeats, args.whole_predict).items()
            }
            host = sum(ms[s] for s in STEPS)
            cells = " | ".join(f"{ms[s]:.2f}" for s in STEPS)
            whole = f"{ms['predict']:.1f}" if "predict" in ms else "not run"
            print(f"| {path} | {size} | {cells} | **{host:.2f}** | {whole} |")
    print()
    print(f"ms per 8-instance image; target: host total under {TARGET_MS} ms")
    print()
    print("device path, aten operations issued per batch (each one kernel launch or a few on")
    print("CUDA; host time there is about these times the launch cost, independent of pixels):")
    print()
    print("| batch | " + " | ".join(STEPS) + " | total | per image |")
    print("|---" * (len(STEPS) + 3) + "|")
    colorizer = Colorizer(networks, device=device, precision=args.precision, device_crops=True)
    for size in BATCHES:
        options = [ColorizeOptions(resolution="network", boxes=eight_boxes(i)) for i in range(size)]
        batch = [colorizer.prepare(photo(i), options[i]) for i in range(size)]
        ops = one_run_device(colorizer, batch, False, count=True)
        total = sum(ops[s] for s in STEPS)
        cells = " | ".join(f"{ops[s]:.0f}" for s in STEPS)
        print(f"| {size} | {cells} | {total:.0f} | {total / size:.1f} |")


if __name__ == "__main__":
    main()
