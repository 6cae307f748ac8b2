"""Lab formulas and quantisation (spec §5.4, §5.7, §7 quirks 11-12)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_impl import np_lab_norm2rgb, np_rgb2lab_norm_l

from models.lab import (
    lab_norm_to_rgb,
    lab_to_rgb,
    lightness_of_uint8,
    normalize_l,
    rgb_to_lab,
    to_uint8,
)


def all_gray_levels() -> torch.Tensor:
    return (torch.arange(256, dtype=torch.float32) / 255).view(1, 1, 256).expand(3, 1, 256)


def test_white_and_black() -> None:
    lab = rgb_to_lab(torch.tensor([1.0, 0.0]).view(1, 1, 2).expand(3, 1, 2))
    assert lab[0, 0, 0].item() == pytest.approx(100.0, abs=1e-3)
    assert abs(lab[1, 0, 0].item()) < 0.01 and abs(lab[2, 0, 0].item()) < 0.01
    assert lab[0, 0, 1].item() == 0.0


def test_gray_levels_have_no_chroma_and_round_trip_exactly_to_8_bit() -> None:
    rgb = all_gray_levels()
    lab = rgb_to_lab(rgb)
    assert lab[1:].abs().max() < 0.01
    back = to_uint8(lab_to_rgb(lab).clamp(0, 1))
    assert torch.equal(back, torch.round(rgb * 255).to(torch.uint8))


def test_l_matches_independent_numpy_transcription() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 64, 64)).astype(np.float32) / np.float32(255)
    ours = normalize_l(rgb_to_lab(torch.from_numpy(rgb))[0:1]).numpy()
    assert np.abs(ours - np_rgb2lab_norm_l(rgb)).max() <= 1e-6


def test_inverse_matches_independent_numpy_transcription() -> None:
    rng = np.random.default_rng(1)
    l_norm = rng.uniform(-0.5, 0.5, size=(1, 32, 32)).astype(np.float32)
    ab_norm = rng.uniform(-1, 1, size=(2, 32, 32)).astype(np.float32)
    ours = lab_norm_to_rgb(torch.from_numpy(l_norm), torch.from_numpy(ab_norm)).numpy()
    assert np.abs(ours - np_lab_norm2rgb(l_norm, ab_norm)).max() <= 1e-6


def test_inverse_clamps_fz_and_linear_rgb_below_zero() -> None:
    # Very large b makes fz negative: the reference clamps fz (only) at 0 before cubing.
    lab = torch.tensor([50.0, 0.0, 300.0]).view(3, 1, 1)
    rgb = lab_to_rgb(lab)
    assert torch.isfinite(rgb).all() and (rgb >= 0).all()
    assert rgb[2].item() == 0.0  # negative linear blue clamped to 0
    bright_red = lab_to_rgb(torch.tensor([90.0, 100.0, 100.0]).view(3, 1, 1))
    assert bright_red[0].item() > 1.0  # no upper clamp inside the conversion (spec §5.4 step 6)


def test_quantisation_rounds_half_to_even() -> None:
    values = torch.tensor([0.5, 1.5, 2.5, 254.5, 300.0, -3.0]) / 255
    assert to_uint8(values).tolist() == [0, 2, 2, 254, 255, 0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=3, max_size=3))
def test_rgb_round_trip(color: list[int]) -> None:
    rgb = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255
    back = to_uint8(lab_to_rgb(rgb_to_lab(rgb)).clamp(0, 1))
    assert (back.int() - torch.tensor(color).view(3, 1, 1)).abs().max() <= 1
    lightness = rgb_to_lab(rgb)[0]
    assert 0.0 <= lightness.item() <= 100.001


def test_lightness_lookup_equals_the_formula() -> None:
    rng = np.random.default_rng(2)
    rgb8 = torch.from_numpy(rng.integers(0, 256, size=(5000, 3), dtype=np.uint8))
    rgb8[:256] = torch.arange(256, dtype=torch.uint8)[:, None]  # every gray level
    fast = lightness_of_uint8(rgb8)
    exact = rgb_to_lab(rgb8.T.float().div(255).unsqueeze(-1))[0, :, 0]
    assert (fast - exact).abs().max() <= 1e-4
