"""Memory is bounded by the pixel budget whatever the image's shape: the peak RSS growth of one
request (decode, model, full-resolution merge, encode) per megapixel is the same for a square and
for a thin image of equal pixel count. Measured in fresh subprocesses (``loadtests/peak_memory``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtests.peak_memory import measure

pytestmark = pytest.mark.slow

# Before the two-step ab resize, a 2,000,000 x 2 image cost about 1,000 MB per megapixel (a
# 256 x 2,000,000 intermediate); square images cost under 100.
MB_PER_MEGAPIXEL_LIMIT = 150.0


def test_thin_and_square_images_cost_the_same_memory_per_pixel(tiny_checkpoints: Path) -> None:
    square = measure(tiny_checkpoints, "2000x1500")
    thin = measure(tiny_checkpoints, "30000x100")
    thinnest = measure(tiny_checkpoints, "1500000x2")
    for row in (square, thin, thinnest):
        assert row["mb_per_megapixel"] < MB_PER_MEGAPIXEL_LIMIT, row
    assert thin["growth_mb"] < square["growth_mb"] * 1.5 + 30, (square, thin)
    assert thinnest["growth_mb"] < square["growth_mb"] * 1.5 + 30, (square, thinnest)
