"""The authors' test loop and the product side by side: seconds per image and the ratio.

A benchmark, not a test. One process runs, on the same seeded full-width (64) weights, the same
photo (a real photo, 640x480, grayscale) and the same 8 supplied boxes, 256x256 output:

* ``reference fp32``: the loop body of the authors' ``test_fusion.py`` (their
  ``Fusion_Testing_Dataset``, ``util.get_colorization_data``, ``FusionModel.forward`` and the PNG
  save of ``save_current_imgs``), imported from a checkout of ericsujw/InstColorization given with
  ``--reference`` (never copied into this repository; tests never need it);
* the product (``Colorizer.colorize`` from the PNG file to a PNG file) at every precision asked
  for, channels_last and NCHW at fp32.

Variants run interleaved, ``--repeats`` rounds, so a machine shared with other jobs slows them all
alike: compare the ratios, not the seconds. Process CPU seconds are printed too (less sensitive to
other processes than wall time). The reference's outputs are also compared with the product's
(RGB share of pixels more than 1 and 3 LSB apart).

Shims (no file of the checkout is edited): the checkout's ``models`` package is imported under
its own name while this repository's ``models`` is set aside, then both are put back; ``IPython``
and ``cv2`` (imported, never used by the loop) are stubbed when not installed; its integer
``interpolation=2`` is given to torchvision as ``BILINEAR``; weights are loaded strictly into the
bare networks (its ``setup_to_test`` reads fixed paths with ``strict=False`` and expects
DataParallel wrappers); its ``.cuda()`` calls and ``torch.cuda.FloatTensor`` casts become
``.to(device)`` and ``.float()``.

    git clone /path/to/InstColorization /tmp/instcol_ref
    python loadtests/bench_reference.py --reference /tmp/instcol_ref            # CPU: fp32, bf16
    python loadtests/bench_reference.py --reference /tmp/instcol_ref --precisions fp32,fp16,bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from bench_pipeline import IMAGE_SIZE, eight_boxes, git_commit, machine  # noqa: E402
from weight_files import write_official  # noqa: E402


def real_photo() -> Image.Image:
    """skimage's 'coffee' photo, grayscale, squashed to 640x480 (a real photo, offline)."""
    from skimage import data

    return Image.fromarray(data.coffee()).convert("L").resize(IMAGE_SIZE, Image.Resampling.BICUBIC)


@contextlib.contextmanager
def reference_imports(checkout: Path) -> Iterator[None]:
    """Import from the checkout: its top-level ``models`` shadows ours only inside this block."""
    ours = {k: m for k, m in sys.modules.items() if k == "models" or k.startswith("models.")}
    for name in ours:
        del sys.modules[name]
    for stub in ("IPython", "cv2"):
        try:
            importlib.import_module(stub)
        except ImportError:
            module = types.ModuleType(stub)
            module.embed = lambda *a, **k: None  # type: ignore[attr-defined]
            sys.modules[stub] = module
    sys.path.insert(0, str(checkout))
    try:
        yield
    finally:
        sys.path.remove(str(checkout))
        for name in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
            sys.modules[f"instcol_reference.{name}"] = sys.modules.pop(name)
        sys.modules.update(ours)


class ReferenceLoop:
    """The authors' test loop for one folder of images with precomputed boxes (``*_bbox``)."""

    def __init__(self, checkout: Path, folder: Path, results: Path, weights: Path, device: str):
        with reference_imports(checkout):
            fusion_dataset = importlib.import_module("fusion_dataset")
            util = importlib.import_module("util.util")
            fusion_model = importlib.import_module("models.fusion_model")
            options = importlib.import_module("options.train_options")
            argv = sys.argv
            sys.argv = ["test_fusion.py", "--name", "test_fusion", "--sample_p", "1.0",
                        "--model", "fusion", "--fineSize", "256", "--gpu_ids", "-1",
                        "--test_img_dir", str(folder), "--results_img_dir", str(results)]  # fmt: skip
            try:
                opt = options.TestOptions().parse()
            finally:
                sys.argv = argv
        opt.batch_size = 1
        self.opt, self.util, self.device = opt, util, torch.device(device)
        resize = fusion_dataset.transforms.Resize

        def bilinear_resize(size: Any, interpolation: Any = 2, **kw: Any) -> Any:
            mode = fusion_dataset.transforms.InterpolationMode.BILINEAR
            return resize(size, interpolation=mode if interpolation == 2 else interpolation, **kw)

        fusion_dataset.transforms.Resize = bilinear_resize
        self.dataset = fusion_dataset.Fusion_Testing_Dataset(opt)
        fusion_dataset.transforms.Resize = resize
        model = fusion_model.FusionModel()
        model.initialize(opt)
        for name, net in (("G", model.netG), ("GF", model.netGF), ("GComp", model.netGComp)):
            state = torch.load(weights / f"latest_net_{name}.pth", weights_only=True)
            state = {k.removeprefix("module."): v for k, v in state.items()}
            bare = getattr(net, "module", net)
            bare.load_state_dict(state, strict=True)
            bare.to(self.device).eval()
        model.device = self.device
        self.model = model
        self.results = results

    def run(self) -> None:
        """test_fusion.py's loop over the folder (DataLoader, batch 1, no worker processes)."""
        from skimage import img_as_ubyte, io

        opt, util, model, device = self.opt, self.util, self.model, self.device
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=1, num_workers=0)
        with torch.no_grad():  # the authors' loop has none; it changes nothing but memory
            for data_raw in loader:
                data_raw["full_img"][0] = data_raw["full_img"][0].to(device)
                if data_raw["empty_box"][0] == 0:
                    data_raw["cropped_img"][0] = data_raw["cropped_img"][0].to(device)
                    box_info = data_raw["box_info"][0]
                    box_info_2x = data_raw["box_info_2x"][0]
                    box_info_4x = data_raw["box_info_4x"][0]
                    box_info_8x = data_raw["box_info_8x"][0]
                    cropped_data = util.get_colorization_data(
                        data_raw["cropped_img"], opt, ab_thresh=0, p=opt.sample_p
                    )
                    full_img_data = util.get_colorization_data(
                        data_raw["full_img"], opt, ab_thresh=0, p=opt.sample_p
                    )
                    model.set_input(cropped_data)
                    model.set_fusion_input(
                        full_img_data, [box_info, box_info_2x, box_info_4x, box_info_8x]
                    )
                    model.forward()
                else:
                    full_img_data = util.get_colorization_data(
                        data_raw["full_img"], opt, ab_thresh=0, p=opt.sample_p
                    )
                    model.set_forward_without_box(full_img_data)
                # save_current_imgs with .float() for its torch.cuda.FloatTensor casts
                lab = torch.cat((model.full_real_A.float(), model.fake_B_reg.float()), dim=1)
                out = torch.clamp(util.lab2rgb(lab, opt), 0.0, 1.0)
                out_img = np.transpose(out.cpu().numpy()[0], (1, 2, 0))
                io.imsave(
                    self.results / f"{data_raw['file_id'][0]}.png",
                    img_as_ubyte(out_img),
                    check_contrast=False,
                )


@dataclass
class Variant:
    name: str
    run: Callable[[], None]
    output: Path
    warmup: Callable[[], None]
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def timed(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.run()
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def product_variant(
    name: str, colorizer: Colorizer, photo: Path, boxes: Detections, out: Path
) -> Variant:
    options = ColorizeOptions(resolution="network", boxes=boxes)

    def run() -> None:
        with Image.open(photo) as image:
            result = colorizer.colorize([image], options)[0]
        result.image.save(out)

    def warmup() -> None:  # the full-image net only: first-call allocations, cheap even in bf16
        with Image.open(photo) as image:
            colorizer.colorize([image], ColorizeOptions(resolution="network", max_instances=0))

    return Variant(name, run, out, warmup)


def rgb_difference(a: Path, b: Path) -> tuple[float, float, int]:
    """Share of pixels with any channel more than 1 and 3 LSB apart, and the largest difference."""
    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    diff = np.abs(x - y).max(axis=-1)
    return float((diff > 1).mean()), float((diff > 3).mean()), int(diff.max())


def comparison(variants: list[Variant]) -> str:
    """The Markdown table: medians, ratios to the reference, output differences."""
    base = statistics.median(variants[0].wall)
    base_cpu = statistics.median(variants[0].cpu)
    fp32 = next(v for v in variants if v.name == "product fp32 channels_last")
    lines = [
        "| run | s/image (median) | each round | CPU s/image | x reference (wall) "
        "| x reference (CPU) | RGB vs reference >1 / >3 LSB, max | RGB vs product fp32 "
        ">1 / >3 LSB, max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        if not v.wall:
            continue
        wall, cpu = statistics.median(v.wall), statistics.median(v.cpu)
        vs_ref = rgb_difference(v.output, variants[0].output)
        vs_fp32 = rgb_difference(v.output, fp32.output)
        lines.append(
            f"| {v.name} | {wall:.2f} | {' / '.join(f'{w:.2f}' for w in v.wall)} "
            f"| {cpu:.2f} | {base / wall:.2f} | {base_cpu / cpu:.2f} "
            f"| {100 * vs_ref[0]:.2f}% / {100 * vs_ref[1]:.2f}%, {vs_ref[2]} "
            f"| {100 * vs_fp32[0]:.2f}% / {100 * vs_fp32[1]:.2f}%, {vs_fp32[2]} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a checkout (work tree) of ericsujw/InstColorization")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precisions", default=None,
                        help="product precisions (default fp32,bf16 on CPU; fp32,fp16,bf16 on "
                        "CUDA); fp32 is also run in NCHW")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (default 2)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not (args.reference / "test_fusion.py").is_file():
        parser.error(f"{args.reference} is not an InstColorization checkout (no test_fusion.py)")
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    default = "fp32,fp16,bf16" if device.startswith("cuda") else "fp32,bf16"
    precisions: list[Precision] = [
        p for p in ("fp32", "fp16", "bf16") if p in (args.precisions or default).split(",")
    ]
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.UTC)

    with tempfile.TemporaryDirectory(prefix="bench-reference-") as scratch:
        root = Path(scratch)
        weights = write_official(
            root / "weights", width=64, seed=0
        )  # the authors' nets are 64 wide
        folder, results = root / "img", root / "results"
        folder.mkdir()
        results.mkdir()
        (root / "img_bbox").mkdir()
        photo = folder / "photo.png"
        real_photo().save(photo)
        boxes = eight_boxes()
        np.savez(root / "img_bbox" / "photo.npz", bbox=np.array(boxes.boxes),
                 scores=np.linspace(0.99, 0.9, len(boxes.boxes)))  # fmt: skip

        reference = ReferenceLoop(args.reference, folder, results, weights, device)
        name = "reference fp32 (authors' loop)"
        variants = [Variant(name, reference.run, results / "photo.png", reference.run)]
        for precision in precisions:
            layouts = [True, False] if precision == "fp32" else [True]
            for channels_last in layouts:
                colorizer = Colorizer(
                    load_networks(weights), None, device, precision, channels_last=channels_last
                )
                name = f"product {precision} {'channels_last' if channels_last else 'NCHW'}"
                out = root / f"{name.replace(' ', '_')}.png"
                variants.append(product_variant(name, colorizer, photo, boxes, out))
        for variant in variants:  # untimed first run of each: first-call allocations
            print(f"warm-up: {variant.name}", flush=True)
            variant.warmup()
        for round_ in range(args.repeats):
            for variant in variants:
                variant.timed()
                print(f"round {round_ + 1}: {variant.name}: {variant.wall[-1]:.2f} s "
                      f"(CPU {variant.cpu[-1]:.2f} s)", flush=True)  # fmt: skip
            print(comparison(variants), flush=True)  # so far: an interrupted run keeps its figures

        table = comparison(variants)
    cpu = probe_cpu().describe()
    header = [
        f"## Product vs the authors' loop (`loadtests/bench_reference.py`), "
        f"{started:%Y-%m-%d %H:%M} UTC, {device}",
        "",
        f"- Machine: {machine(torch.device(device))}",
        f"- CPU bf16 probe: capability {cpu['capability']}, native bf16 {cpu['native_bf16']} "
        f"({', '.join(cpu['bf16_instructions']) or 'no AMX, no AVX512-BF16'})",
        "- Load average before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}".format(
            *load_before, *os.getloadavg()
        ),
        "- Weights: seeded random width-64 networks (official layout, the real loader); photo: "
        "skimage 'coffee', grayscale, 640x480; 8 supplied boxes; 256x256 output PNG",
        f"- {args.repeats} interleaved rounds after one untimed run each; commit {git_commit()}",
        "",
    ]
    report = "\n".join(header) + table + "\n"
    print(report)
    if not args.no_write:
        with args.output.open("a") as f:
            f.write("\n" + report)
        print(f"appended to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
