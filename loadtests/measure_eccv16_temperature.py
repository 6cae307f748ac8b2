"""Which temperature convention an ECCV16 weight file follows (docs/models.md, "Temperature").

    python loadtests/measure_eccv16_temperature.py colorization_release_v2-9b330a0b.pth \\
        --images DIR_OF_COLOUR_PHOTOS [--limit 100] [--json]

The paper decodes by the annealed mean, softmax(z / 0.38); the Caffe deploy file applies it as a
Scale layer of 2.606 (= 1 / 0.38) before its softmax. The PyTorch release has no such step, so
either its logits are the training's (its plain softmax is T = 1, the mean) or the factor is folded
into the last conv (``model8.6``: its plain softmax is then already the paper's T = 0.38). Two
measurements tell them apart from the file alone and colour photos:

1. The decoding layer: ``model_out`` (1x1 conv 313 -> 2, no bias) must hold the 313 bin centres
   / 110 on the 10-unit ab grid: then decoding is the plain expectation of the softmax, and no
   temperature can be folded there (the softmax is nonlinear). The centres are compared with the
   grid and with the in-gamut rule of ``models.li_dcnn.grid_bin_centres``.
2. The logits' scale: the network was trained with (class-rebalanced) cross-entropy, so
   softmax(z) is roughly calibrated on colour photos: the temperature tau* that minimises the
   negative log-likelihood of the photos' own ab bins under softmax(z / tau) is near 1 for logits
   as trained, near 1 / 0.38 = 2.63 for logits with the paper's factor folded in. Convention:
   tau* < 1.35: "plain" (T = 1 is the mean; the paper's rule is ``temperature=0.38``);
   tau* > 1.95: "folded" (the release's T = 1 already is the paper's annealed mean);
   in between: "inconclusive". The class rebalancing biases tau* somewhat, not by a factor 2.6.

``--lab FILE.npz`` (arrays ``L`` (N, 256, 256) and ``ab`` (N, 2, 256, 256), Lab units) replaces
the photos by given Lab data; tests/test_temperature_measure.py uses it with data drawn from a
seeded network. Exit codes: 0 measured; 2 a missing or unusable file or input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.checkpoints import CheckpointError, sha256_file
from models.lab import AB_NORM, rgb_to_lab
from models.li_dcnn import grid_bin_centres
from models.zhang_eccv16 import FILENAME, INPUT_SIZE, PAPER_TEMPERATURE, load_zhang_eccv16

OFFICIAL_SHA256 = "9b330a0bae53f4ded77b1e23defbf78beaa09c10ebc4c4999e8e4f4a160b93f9"
URL = f"https://colorizers.s3.us-east-2.amazonaws.com/{FILENAME}"
PLAIN_BELOW, FOLDED_ABOVE = 1.35, 1.95
LOG_BETA_RANGE = (float(np.log(0.1)), float(np.log(10.0)))  # tau* searched in [0.1, 10]
MIN_CHROMA = 3.0  # photos whose mean chroma is below this are grey: left out
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


class MeasureError(Exception):
    """A missing or unusable input (exit code 2)."""


def check_decoding_layer(model_out: torch.Tensor) -> dict[str, Any]:
    """Measurement 1: ``model_out``'s weight as bin centres in ab units."""
    centres = model_out[:, :, 0, 0].double().t() * AB_NORM  # (313, 2)
    off_grid = float((centres - torch.round(centres / 10.0) * 10.0).abs().max())
    on_grid = {tuple(int(v) for v in row) for row in torch.round(centres).tolist()}
    rule = {tuple(int(v) for v in row) for row in grid_bin_centres().round().tolist()}
    return {
        "bins": int(centres.shape[0]),
        "distinct_centres": len(on_grid),
        "max_off_grid": off_grid,
        "plain_expectation": off_grid < 1e-3 and len(on_grid) == centres.shape[0],
        "centres_outside_in_gamut_rule": len(on_grid - rule),
    }


def photo_lab(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each photo as the product feeds it (RGB resized to 256, bilinear) in Lab: L and ab."""
    from PIL import Image

    ls, abs_ = [], []
    for path in paths:
        try:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB").resize(
                    (INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR
                )
        except OSError as exc:
            raise MeasureError(f"{path}: not a readable image ({exc})") from None
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        lab = rgb_to_lab(x)
        ls.append(lab[0])
        abs_.append(lab[1:])
    return torch.stack(ls), torch.stack(abs_)


def bin_labels(ab: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, 2, 256, 256) ab -> (N, 64, 64) index of the nearest bin centre of each 4x4 block's
    mean ab (the logits' grid)."""
    pooled = F.avg_pool2d(ab.double(), 4)  # (N, 2, 64, 64)
    flat = pooled.permute(0, 2, 3, 1).reshape(-1, 2)
    nearest = torch.cdist(flat, centres.double()).argmin(dim=1)
    return nearest.view(pooled.shape[0], pooled.shape[2], pooled.shape[3])


@torch.inference_mode()
def measure(path: Path, lightness: torch.Tensor, ab: torch.Tensor) -> dict[str, Any]:
    """Both measurements on ``path`` with Lab data (N, 256, 256) L and (N, 2, 256, 256) ab."""
    try:
        network = load_zhang_eccv16(path)
    except CheckpointError as exc:
        raise MeasureError(str(exc)) from None
    decoding = check_decoding_layer(network.model_out.weight)
    centres = network.model_out.weight[:, :, 0, 0].double().t() * AB_NORM
    chroma = ab.double().norm(dim=1).mean(dim=(1, 2))
    keep = chroma >= MIN_CHROMA
    if not bool(keep.any()):
        raise MeasureError(f"no colour input (every mean chroma is below {MIN_CHROMA})")
    logits, labels = [], []
    entropy = 0.0
    for i in torch.nonzero(keep).flatten().tolist():
        z = network.logits((lightness[i : i + 1, None] - 50.0) / 100.0)[0]  # (313, h, w)
        z = z.reshape(z.shape[0], -1)  # (313, P)
        logits.append(z)
        labels.append(bin_labels(ab[i : i + 1], centres)[0].reshape(-1))
        p = torch.softmax(z.double(), dim=0)
        entropy += float(-(p * torch.log(p.clamp_min(1e-300))).sum())
    z_all = torch.cat(logits, dim=1)  # (313, pixels), float32
    picked = z_all.gather(0, torch.cat(labels).reshape(1, -1))[0].double()
    pixels = int(z_all.shape[1])

    def mean_nll(log_beta: float) -> float:
        """The NLL of the true bins under softmax(beta z), per pixel (convex in beta)."""
        beta = float(np.exp(log_beta))
        total = 0.0
        for chunk in range(0, pixels, 65536):
            zc = z_all[:, chunk : chunk + 65536].double()
            pc = picked[chunk : chunk + 65536]
            total += float((torch.logsumexp(beta * zc, dim=0) - beta * pc).sum())
        return total / pixels

    low, high = LOG_BETA_RANGE  # golden-section search on log beta
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = mean_nll(a), mean_nll(b)
    while high - low > 1e-4:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = mean_nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = mean_nll(b)
    best_log_beta = (low + high) / 2.0
    tau = float(np.exp(-best_log_beta))
    if PLAIN_BELOW <= tau <= FOLDED_ABOVE:
        convention = "inconclusive"
    else:
        convention = "plain" if tau < PLAIN_BELOW else "folded"
    if not decoding["plain_expectation"]:
        convention = "not-the-release-layout"
    return {
        "file": str(path),
        "sha256": (digest := sha256_file(path)),
        "official_file": digest == OFFICIAL_SHA256,
        "images_used": int(keep.sum()),
        "images_grey_left_out": int((~keep).sum()),
        "pixels": pixels,
        "decoding_layer": decoding,
        "nll_optimal_temperature": tau,
        "nll_at_1": mean_nll(0.0),
        "nll_at_optimum": mean_nll(best_log_beta),
        "mean_entropy_nats": entropy / pixels,
        "convention": convention,
    }


def explain(result: dict[str, Any]) -> str:
    decoding = result["decoding_layer"]
    lines = [
        f"file: {result['file']} (sha256 {result['sha256'][:12]}..., "
        + ("the official file" if result["official_file"] else "NOT the official file")
        + ")",
        f"decoding layer: {decoding['distinct_centres']} distinct centres of {decoding['bins']}, "
        f"max off the 10-unit grid {decoding['max_off_grid']:.2e}, "
        f"{decoding['centres_outside_in_gamut_rule']} outside the in-gamut rule: "
        + (
            "the plain expectation over the bin centres"
            if decoding["plain_expectation"]
            else "NOT the bin-centre expectation"
        ),
        f"{result['images_used']} colour inputs ({result['images_grey_left_out']} grey left out), "
        f"{result['pixels']} logit pixels; mean entropy of softmax(z) "
        f"{result['mean_entropy_nats']:.3f} nats",
        f"NLL-optimal temperature tau* = {result['nll_optimal_temperature']:.3f} "
        f"(NLL {result['nll_at_optimum']:.4f} nats/pixel; at T = 1: {result['nll_at_1']:.4f})",
    ]
    verdicts = {
        "plain": "convention: PLAIN - the file's logits are as trained; its T = 1 (the default) "
        f"is the plain mean, temperature={PAPER_TEMPERATURE} applies the paper's annealed mean",
        "folded": f"convention: FOLDED - the paper's 1/{PAPER_TEMPERATURE} is in the logits; "
        "T = 1 (the default) already is the paper's annealed mean",
        "inconclusive": f"convention: INCONCLUSIVE - tau* is between {PLAIN_BELOW} and "
        f"{FOLDED_ABOVE}; use more (and more varied) colour photos",
        "not-the-release-layout": "convention: none - model_out does not hold bin centres",
    }
    lines.append(verdicts[result["convention"]])
    return "\n".join(lines)


def lab_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.lab is not None:
        try:
            data = np.load(args.lab)
            lightness, ab = torch.from_numpy(data["L"]), torch.from_numpy(data["ab"])
        except (OSError, KeyError, ValueError) as exc:
            raise MeasureError(f"{args.lab}: expected an .npz with L and ab ({exc})") from None
        shape = (INPUT_SIZE, INPUT_SIZE)
        if lightness.dim() != 3 or tuple(lightness.shape[1:]) != shape or ab.dim() != 4:
            raise MeasureError(f"{args.lab}: L must be (N, 256, 256) and ab (N, 2, 256, 256)")
        return lightness.float(), ab.float()
    folder: Path = args.images
    if not folder.is_dir():
        raise MeasureError(f"--images {folder}: not a folder of colour photos")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MeasureError(f"--images {folder}: no image files")
    return photo_lab(paths[: args.limit])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help=f"the ECCV16 file ({FILENAME})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of colour photos (any size)")
    source.add_argument("--lab", type=Path, help="an .npz with L (N,256,256) and ab (N,2,256,256)")
    parser.add_argument("--limit", type=int, default=100, help="most photos read (default 100)")
    parser.add_argument(
        "--json", action="store_true", help="print the result as one JSON line after the text"
    )
    args = parser.parse_args(argv)
    if not args.weights.is_file():
        sys.stderr.write(
            f"error: {args.weights} not found. This measurement needs the real file "
            f"{FILENAME} (sha256 {OFFICIAL_SHA256[:12]}...), which cannot be downloaded here: "
            f"fetch it where there is network access (`python -m service fetch-weights --model "
            f"zhang-eccv16`, or {URL}) and pass its path\n"
        )
        return 2
    try:
        result = measure(args.weights, *lab_inputs(args))
    except MeasureError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(explain(result) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
