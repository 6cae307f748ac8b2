"""Per-image quality metrics and their summary statistics, on HxWx3 uint8 RGB arrays.

PSNR and SSIM are scikit-image's; LPIPS is the ``lpips`` package's v0.1 metric with the VGG16
backbone loaded from a local torchvision file (nothing is downloaded); colorfulness is Hasler and
Suesstrunk (2003), written out because no well-kept library ships it. Scores are computed on the
saved 8-bit images, so anyone with the files can recompute them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchvision.models import VGG16_Weights

from models.checkpoints import CheckpointError

DATA_RANGE = 255
VGG16_URL = VGG16_Weights.IMAGENET1K_V1.url
"""torchvision's ImageNet VGG16, the backbone LPIPS v0.1 was calibrated on; its name
(``vgg16-397923af.pth``) carries the sha256 prefix torchvision checks."""
VGG16_FILENAME = VGG16_URL.rsplit("/", 1)[-1]
VGG16_FEATURE_LAYERS = 30  # torchvision vgg16.features[0:30]: conv1_1 .. relu5_3 (LPIPS slices)


def _check_pair(pred: np.ndarray, target: np.ndarray) -> None:
    for name, array in (("pred", pred), ("target", target)):
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"{name} must be an (H, W, 3) uint8 array, got {array.dtype} {array.shape}"
            )
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in size")


def psnr(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB over all RGB values, data range 255; ``inf`` when the images are identical."""
    _check_pair(pred, target)
    if np.array_equal(pred, target):
        return math.inf
    return float(peak_signal_noise_ratio(target, pred, data_range=DATA_RANGE))


def ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """scikit-image SSIM per colour channel (7x7 window), averaged over R, G, B."""
    _check_pair(pred, target)
    return float(structural_similarity(target, pred, channel_axis=2, data_range=DATA_RANGE))


def colorfulness(image: np.ndarray) -> float:
    """Hasler and Suesstrunk (2003) M = sigma_rgyb + 0.3 mu_rgyb on 0..255 values; 0 for grey."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {image.shape}")
    rgb = image.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    sigma = math.hypot(float(rg.std()), float(yb.std()))
    mu = math.hypot(float(rg.mean()), float(yb.mean()))
    return sigma + 0.3 * mu


class LpipsError(CheckpointError):
    """The VGG16 file is missing, unreadable or not a torchvision VGG16 state dict."""


def _vgg16_backbone_state(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """torchvision ``features.N.*`` keys -> the lpips backbone's ``sliceK.N.*`` keys."""
    slices = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)))
    slice_of = {n: k for k, layers in (*slices, (5, range(23, 30))) for n in layers}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
            index = int(parts[1])
            if index < VGG16_FEATURE_LAYERS:
                mapped[f"slice{slice_of[index]}.{index}.{parts[2]}"] = value
    if not mapped:
        raise LpipsError(
            f"{path} has no 'features.N.weight' keys: expected a torchvision vgg16 state dict "
            "(e.g. vgg16-397923af.pth from `python -m service fetch-weights --lpips-vgg16`)"
        )
    return mapped


class LpipsMetric:
    """LPIPS v0.1 (linear layers from the ``lpips`` wheel) on a VGG16 backbone from a local file."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model.to(device).eval()
        self.device = device

    @classmethod
    def from_vgg16_file(cls, path: Path, device: str = "cpu") -> LpipsMetric:
        import lpips  # heavy import, only when LPIPS is asked for

        path = Path(path)
        if not path.is_file():
            raise LpipsError(
                f"VGG16 weights file {path} not found; fetch it with "
                "`python -m service fetch-weights --lpips-vgg16 DIR`"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LpipsError(f"cannot read VGG16 weights {path}: {exc}") from exc
        if not isinstance(state, dict):
            raise LpipsError(f"{path} does not hold a state dict")
        # pnet_rand=True: torchvision builds vgg16(weights=None), so nothing is downloaded; the
        # linear layers (pretrained=True) come from the file inside the lpips wheel.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(
                net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False
            )
        try:
            model.net.load_state_dict(_vgg16_backbone_state(state, path), strict=True)
        except RuntimeError as exc:
            raise LpipsError(f"{path} does not fit the VGG16 backbone: {exc}") from exc
        return cls(model, torch.device(device))

    @staticmethod
    def _to_tensor(image: np.ndarray) -> torch.Tensor:
        """uint8 HxWx3 -> (1, 3, H, W) in [-1, 1], as ``lpips.im2tensor``."""
        return (
            torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 127.5
            - 1.0
        )

    @torch.inference_mode()
    def __call__(self, pred: np.ndarray, target: np.ndarray) -> float:
        _check_pair(pred, target)
        a = self._to_tensor(pred).to(self.device)
        b = self._to_tensor(target).to(self.device)
        return float(self.model(a, b).item())


def score_pair(pred: np.ndarray, target: np.ndarray, lpips: LpipsMetric | None) -> dict[str, float]:
    """psnr, ssim, lpips (nan without a metric) and the colorfulness of ``pred``."""
    return {
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target),
        "lpips": math.nan if lpips is None else lpips(pred, target),
        "colorfulness": colorfulness(pred),
    }


def _mean_interval(values: np.ndarray) -> tuple[float, float]:
    """Student-t 95% interval of the mean; nan below two values."""
    if values.size < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    sem = float(values.std(ddof=1)) / math.sqrt(values.size)
    if sem == 0.0:
        return mean, mean
    half = float(stats.t.ppf(0.975, values.size - 1)) * sem
    return mean - half, mean + half


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """mean, median, 95% CI of the mean over the finite values; infinities counted, left out.

    ``count`` is the number of finite values used; ``infinite`` how many were +-inf (identical
    images give PSNR inf); nan (a metric not computed) is ignored.
    """
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    infinite = int(np.isinf(array).sum())
    if finite.size == 0:
        mean = median = math.nan
    else:
        mean, median = float(finite.mean()), float(np.median(finite))
    low, high = _mean_interval(finite)
    return {
        "mean": mean,
        "median": median,
        "ci95_low": low,
        "ci95_high": high,
        "count": int(finite.size),
        "infinite": infinite,
    }


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int]:
    """summarize(b - a) over the pairs where both are finite (the same image in two runs)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.size} and {y.size}")
    both = np.isfinite(x) & np.isfinite(y)
    summary = summarize((y - x)[both])
    summary["infinite"] = int((np.isinf(x) | np.isinf(y)).sum())
    return summary
