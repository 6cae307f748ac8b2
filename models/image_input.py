"""The product's input policy (spec §10 (d)): one upright 8-bit RGB frame, alpha kept aside.

The reference feeds PIL's raw decode to the network (palette indices read as gray, no EXIF
rotation, 16-bit and CMYK broken). Here every mode is converted explicitly: EXIF orientation is
applied first, so detection, colorization and output share one frame; a colour input is used
only through its luminance, like the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class UnsupportedImageError(ValueError):
    """The image decodes but its pixel format cannot be colorized."""


@dataclass(frozen=True)
class InputImage:
    """An upright 8-bit RGB image and, if the input had one, its alpha channel (mode ``L``)."""

    rgb: Image.Image
    alpha: Image.Image | None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.size


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if values.size and values.max() > 255.0:
        values = values * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def to_input_image(image: Image.Image) -> InputImage:
    """Apply EXIF orientation and convert any supported mode to RGB, separating alpha."""
    upright = ImageOps.exif_transpose(image) or image
    mode = upright.mode
    alpha: Image.Image | None = None
    if mode == "P":
        upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
        mode = upright.mode
    if mode in _ALPHA_MODES:
        converted = upright.convert("RGBA")
        alpha = converted.getchannel("A")
        rgb = converted.convert("RGB")
    elif mode in _SIXTEEN_BIT_MODES:
        rgb = _sixteen_bit_to_l(upright).convert("RGB")
    elif mode == "F":
        raise UnsupportedImageError(
            "32-bit floating-point images are not supported; convert to 8- or 16-bit first"
        )
    elif mode == "RGB":
        rgb = upright
    else:  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions
        rgb = upright.convert("RGB")
    rgb.load()
    return InputImage(rgb=rgb, alpha=alpha)
