"""RGB <-> CIE Lab exactly as the reference computes it (spec §5.4), in float32 torch.

The reference combines the branches of each piecewise function with 0/1 masks; for finite input
that equals ``torch.where``, which is what is used here. Do not substitute skimage, cv2 or kornia.
"""

from __future__ import annotations

import torch

L_CENT = 50.0
L_NORM = 100.0
AB_NORM = 110.0

_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_XYZ_TO_RGB = (
    (3.24048134, -1.53715152, -0.49853633),
    (-0.96925495, 1.87599, 0.04155593),
    (0.05564664, -0.20404134, 1.05731107),
)
_WHITE = (0.95047, 1.0, 1.08883)


def _linearize(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def _f(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0.008856, t ** (1.0 / 3.0), 7.787 * t + 16.0 / 116.0)


def _mix(m: tuple[tuple[float, float, float], ...], x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix along the channel axis (-3), term by term as the reference does."""
    c0, c1, c2 = x.unbind(-3)
    rows = [r[0] * c0 + r[1] * c1 + r[2] * c2 for r in m]
    return torch.stack(rows, dim=-3)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float RGB in [0, 1] -> (..., 3, H, W) Lab (L in [0, 100])."""
    xyz = _mix(_RGB_TO_XYZ, _linearize(rgb.float()))
    white = torch.tensor(_WHITE, dtype=xyz.dtype, device=xyz.device).view(3, 1, 1)
    fx, fy, fz = _f(xyz / white).unbind(-3)
    lightness = 116.0 * fy - 16.0
    a = 500.0 * (fx - fy)
    b = 200.0 * (fy - fz)
    return torch.stack((lightness, a, b), dim=-3)


def _lab_to_linear_rgb(lab: torch.Tensor) -> torch.Tensor:
    lab = lab.float()
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = torch.clamp(fy - b / 200.0, min=0.0)
    f = torch.stack((fx, fy, fz), dim=-3)
    t = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    white = torch.tensor(_WHITE, dtype=t.dtype, device=t.device).view(3, 1, 1)
    return torch.clamp(_mix(_XYZ_TO_RGB, t * white), min=0.0)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) Lab -> (..., 3, H, W) RGB, clamped below at 0 but not above (as the reference)."""
    lin = _lab_to_linear_rgb(lab)
    return torch.where(lin > 0.0031308, 1.055 * lin ** (1.0 / 2.4) - 0.055, 12.92 * lin)


# sRGB decoding of an 8-bit value is a 256-entry table: full-resolution L without three powers
# per pixel (not used on the parity path, which works on the 256x256 float image).
_LINEAR_OF_UINT8 = _linearize(torch.arange(256, dtype=torch.float32) / 255)


def lightness_of_uint8(rgb8: torch.Tensor) -> torch.Tensor:
    """(N, 3) uint8 RGB -> (N,) Lab L, the same formulas as ``rgb_to_lab`` via a lookup table."""
    lin = _LINEAR_OF_UINT8[rgb8.long()]
    r, g, b = _RGB_TO_XYZ[1]
    y = r * lin[:, 0] + g * lin[:, 1] + b * lin[:, 2]
    return 116.0 * _f(y / _WHITE[1]) - 16.0


def normalize_l(lightness: torch.Tensor) -> torch.Tensor:
    return (lightness - L_CENT) / L_NORM


def denormalize_l(l_norm: torch.Tensor) -> torch.Tensor:
    return l_norm * L_NORM + L_CENT


def lab_norm_to_rgb(l_norm: torch.Tensor, ab_norm: torch.Tensor) -> torch.Tensor:
    """Normalised L (..., 1, H, W) and ab (..., 2, H, W) -> RGB clamped to [0, 1]."""
    lab = torch.cat((denormalize_l(l_norm.float()), ab_norm.float() * AB_NORM), dim=-3)
    return lab_to_rgb(lab).clamp(0.0, 1.0)


def to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 like ``skimage.img_as_ubyte``: round half to even of x*255 in float32."""
    return torch.round(rgb.float() * 255.0).clamp(0, 255).to(torch.uint8)
