"""FID over a whole set (optional): pytorch-fid's Inception (the TensorFlow FID port) from a file.

``pytorch_fid.inception.InceptionV3`` fetches its weights with ``load_state_dict_from_url`` while
it is built; here that one call is answered from a local file instead (``_local_weights``), so
nothing is downloaded, and the file is loaded strictly by the library's own ``load_state_dict``.
The distance is the library's ``calculate_frechet_distance`` on the 2048-d pool features.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from scipy.linalg import LinAlgWarning

from models.checkpoints import CheckpointError

FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
"""pytorch-fid's file name for its Inception weights (``pytorch_fid.inception.FID_WEIGHTS_URL``)."""
FID_DIMS = (64, 192, 768, 2048)
"""Feature sizes pytorch-fid offers (its ``--dims``): 2048, the final average pool, is the standard
FID; the smaller, earlier blocks suit sets of fewer than 2048 images (pytorch-fid's advice)."""


class FidError(CheckpointError):
    """The Inception file is missing, unreadable or not pytorch-fid's FID Inception."""


@contextmanager
def _local_weights(path: Path) -> Iterator[None]:
    """While building pytorch-fid's network, answer its one weight download from ``path``."""
    from pytorch_fid import inception

    def from_file(url: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if url != inception.FID_WEIGHTS_URL:  # anything else would be a download: refuse it
            raise FidError(f"pytorch-fid asked for {url}, not its FID weights")
        state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
        return state

    loader: Callable[..., dict[str, torch.Tensor]] = from_file
    with mock.patch.object(inception, "load_state_dict_from_url", loader):
        yield


class FidFeatures:
    """Inception pool features of uint8 RGB images, for the Frechet distance of two sets."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dims: int = 2048) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.dims = dims

    @classmethod
    def from_inception_file(cls, path: Path, device: str = "cpu", dims: int = 2048) -> FidFeatures:
        from pytorch_fid.inception import InceptionV3

        if dims not in FID_DIMS:
            raise FidError(f"FID features must be one of {FID_DIMS}, got {dims}")
        path = Path(path)
        if not path.is_file():
            raise FidError(
                f"FID Inception weights {path} not found; download {FID_FILENAME} from "
                "pytorch-fid's releases (see docs/evaluation.md)"
            )
        try:
            with _local_weights(path):
                model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]])
        except FidError:
            raise
        except Exception as exc:  # unreadable file, wrong or missing keys
            raise FidError(f"{path} is not pytorch-fid's FID Inception: {exc}") from exc
        return cls(model, torch.device(device), dims)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (dims,) float64 (the network resizes to 299x299 itself)."""
        x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float() / 255.0
        (features,) = self.model(x.to(self.device))
        if features.shape[-1] != 1:  # blocks before the last: spatial maps, pooled like pytorch-fid
            features = torch.nn.functional.adaptive_avg_pool2d(features, (1, 1))
        return features.reshape(-1).double().cpu().numpy()


def frechet_distance(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """FID between two feature sets (nan below two images each: no covariance)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if len(a) < 2 or len(b) < 2:
        return math.nan
    x, y = np.stack(a), np.stack(b)
    with warnings.catch_warnings():
        # scipy deprecates the library's sqrtm(disp=...); below 2048 images the covariance is
        # singular (LinAlgWarning), which the report states beside the figure
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(
            calculate_frechet_distance(
                x.mean(axis=0), np.cov(x, rowvar=False), y.mean(axis=0), np.cov(y, rowvar=False)
            )
        )
