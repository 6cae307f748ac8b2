"""The grey image training sees (spec §6): the network input of every evaluation and validation.

skimage ``rgb2gray`` (luma weights 0.2125, 0.7154, 0.0721 on the sRGB values), x255, rounded to
uint8 and replicated to three channels. Evaluation colorizes this image, not the colour original,
so the score measures what the model adds beyond the luminance it was trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from skimage.color import rgb2gray


def training_grey_array(rgb_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 grey, the three channels equal."""
    if rgb_uint8.dtype != np.uint8 or rgb_uint8.ndim != 3 or rgb_uint8.shape[2] != 3:
        raise ValueError(
            f"expected an (H, W, 3) uint8 array, got {rgb_uint8.dtype} {rgb_uint8.shape}"
        )
    grey = np.round(rgb2gray(rgb_uint8) * 255.0).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def training_grey(image: Image.Image) -> Image.Image:
    """An RGB image -> its training grey version as an RGB image (other modes converted first)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return Image.fromarray(training_grey_array(rgb))
