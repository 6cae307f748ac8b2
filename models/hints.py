"""Colour hints: sparse ab points a person places, as the user-guided network sees them.

Zhang et al.'s SIGGRAPH 2017 network takes, besides L, an ab hint plane and a mask
(``[L, ab/110, mask]``). A hint is a point in *input* pixels with a colour (an sRGB colour, of
which only the Lab ab is used: the image keeps its own L, or a Lab ab pair) and a square patch
side ``size`` in *network* pixels (1-9, the authors' ``sample_Ps``). It is placed as the
authors' GUI places a click: the point is mapped to the network's squashed square input, a
``size`` x ``size`` patch centred on it (clipped at the border) gets ab / 110 and mask 1; later
hints overwrite earlier ones where patches overlap. The mask's *value* per convention is the
model's business (``ZhangSIGGRAPH17``: 1 / 0; InstColorization: +0.5 / -0.5).

Training samples hints from the ground truth with :func:`sample_hints` (the authors'
``add_color_patches_rand_gt``): a geometric number of patches, each of a random size in 1-9 at a
random place, holding the patch's mean ground-truth ab.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from models.constants import DEFAULT_HINT_SIZE, HINT_SIZE_RANGE, MAX_HINTS
from models.lab import AB_NORM, rgb_to_lab
from models.preprocess import to_tensor

HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
AB_RANGE = (-110.0, 110.0)  # the network's ab range (tanh x 110)
INSTCOLOR_MASK_CENT = 0.5  # InstColorization's mask_cent: its networks see mask - 0.5


class HintError(ValueError):
    """A hint is malformed or does not fit the image; the message says which and how to fix it."""


@dataclass(frozen=True)
class Hint:
    """One colour point: ``x``, ``y`` in input pixels (after EXIF rotation), Lab ``a``, ``b``."""

    x: float
    y: float
    a: float
    b: float
    size: int = DEFAULT_HINT_SIZE

    @classmethod
    def from_color(cls, x: float, y: float, color: str, size: int = DEFAULT_HINT_SIZE) -> Hint:
        """A hint from an sRGB ``#rrggbb`` colour: its Lab ab (its lightness is not used)."""
        a, b = hex_to_ab(color)
        return cls(float(x), float(y), a, b, int(size))

    @classmethod
    def from_dict(cls, item: dict[str, object]) -> Hint:
        """``{"x", "y", "color": "#rrggbb" | "ab": [a, b], "size"?}`` as the API carries it."""
        size = int(item.get("size") or DEFAULT_HINT_SIZE)  # type: ignore[call-overload]
        x, y = float(item["x"]), float(item["y"])  # type: ignore[arg-type]
        color = item.get("color")
        if color is not None:
            return cls.from_color(x, y, str(color), size)
        ab = item.get("ab")
        if not isinstance(ab, list | tuple) or len(ab) != 2:
            raise HintError('a hint needs "color": "#rrggbb" or "ab": [a, b]')
        return cls(x, y, float(ab[0]), float(ab[1]), size)


def hex_to_ab(color: str) -> tuple[float, float]:
    """``#rrggbb`` -> Lab (a, b) with the product's own Lab conversion (spec §5.4)."""
    if not HEX_COLOR.match(color):
        raise HintError(f"hint colour {color!r} is not of the form #rrggbb (e.g. #3a7bd5)")
    rgb = [int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5)]
    lab = rgb_to_lab(torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1))
    return float(lab[1, 0, 0]), float(lab[2, 0, 0])


def check_hints(hints: Sequence[Hint], width: int, height: int) -> None:
    """Refuse too many hints, points outside the ``width`` x ``height`` image, bad sizes or ab."""
    if len(hints) > MAX_HINTS:
        raise HintError(f"{len(hints)} hints given; at most {MAX_HINTS} are accepted")
    low, high = HINT_SIZE_RANGE
    for i, hint in enumerate(hints):
        if not (math.isfinite(hint.x) and math.isfinite(hint.y)):
            raise HintError(f"hint {i}: x and y must be finite numbers")
        if not (0 <= hint.x < width and 0 <= hint.y < height):
            raise HintError(
                f"hint {i} at ({hint.x:g}, {hint.y:g}) is outside the image: x must be in "
                f"[0, {width}) and y in [0, {height}) (input pixels, after EXIF rotation)"
            )
        if not low <= hint.size <= high:
            raise HintError(f"hint {i}: size must be between {low} and {high}, got {hint.size}")
        if not all(AB_RANGE[0] <= v <= AB_RANGE[1] for v in (hint.a, hint.b)):
            raise HintError(f"hint {i}: ab must be within [-110, 110], got ({hint.a}, {hint.b})")


def patch_bounds(hint: Hint, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the hint's patch in the ``size`` x ``size`` network input:
    the point's pixel mapped by the squash (x * size / width), the patch centred and clipped."""
    cx = min(size - 1, max(0, math.floor(hint.x * size / width)))
    cy = min(size - 1, max(0, math.floor(hint.y * size / height)))
    before = (hint.size - 1) // 2
    top, left = max(0, cy - before), max(0, cx - before)
    return top, min(size, cy - before + hint.size), left, min(size, cx - before + hint.size)


def hint_planes(
    hints: Sequence[Hint], width: int, height: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, S, S) hint ab in Lab units and (1, S, S) mask (1 where hinted, 0 elsewhere)."""
    ab = torch.zeros((2, size, size), dtype=torch.float32)
    mask = torch.zeros((1, size, size), dtype=torch.float32)
    for hint in hints:
        top, bottom, left, right = patch_bounds(hint, width, height, size)
        ab[0, top:bottom, left:right] = hint.a
        ab[1, top:bottom, left:right] = hint.b
        mask[:, top:bottom, left:right] = 1.0
    return ab, mask


def sample_hints(
    ab_norm: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    sizes: tuple[int, int] = HINT_SIZE_RANGE,
    max_points: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' random ground-truth hints (``add_color_patches_rand_gt``), per image.

    ``ab_norm`` (N, 2, H, W) is the ground truth / 110. For each image, patches are added while a
    uniform draw is above ``p`` (so their number is geometric with mean (1 - p) / p; ``p`` = 1: no
    hints, the released InstColorization setting); each has a side drawn uniformly from ``sizes``,
    a uniform top-left corner, and holds the patch's mean ground-truth ab. ``max_points`` caps
    the count (None: no cap). Returns normalised hint ab (N, 2, H, W) and the 0/1 mask
    (N, 1, H, W).
    """
    n, _, h, w = ab_norm.shape
    hint = torch.zeros_like(ab_norm)
    mask = torch.zeros((n, 1, h, w), dtype=ab_norm.dtype, device=ab_norm.device)
    for i in range(n):
        placed = 0
        while max_points is None or placed < max_points:
            if p >= 1.0 or float(torch.rand((), generator=generator)) < p:
                break
            placed += 1
            side = int(torch.randint(sizes[0], sizes[1] + 1, (), generator=generator))
            top = int(torch.randint(0, h - side + 1, (), generator=generator))
            left = int(torch.randint(0, w - side + 1, (), generator=generator))
            patch = ab_norm[i, :, top : top + side, left : left + side]
            hint[i, :, top : top + side, left : left + side] = patch.mean(dim=(1, 2), keepdim=True)
            mask[i, :, top : top + side, left : left + side] = 1.0
    return hint, mask


def sample_n_hints(
    ab_norm: torch.Tensor,
    count: int,
    generator: torch.Generator | None = None,
    sizes: tuple[int, int] = HINT_SIZE_RANGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``count`` ground-truth hints per image (the SIGGRAPH17 paper's evaluation protocol:
    random points revealing the patch's mean ab); normalised ab and 0/1 mask as ``sample_hints``."""
    if count <= 0:
        n, _, h, w = ab_norm.shape
        return torch.zeros_like(ab_norm), ab_norm.new_zeros((n, 1, h, w))
    return sample_hints(ab_norm, 0.0, generator, sizes, max_points=count)


def ground_truth_hints(
    colour: Image.Image,
    count: int,
    input_size: tuple[int, int],
    generator: torch.Generator,
    sizes: tuple[int, int] = HINT_SIZE_RANGE,
    network_size: int = 256,
) -> list[Hint]:
    """``count`` hints revealing the ground truth (hinted evaluation, the SIGGRAPH17 protocol).

    Each hint has a uniform random centre in the network's ``network_size`` square, a side
    uniform in ``sizes`` and the mean ab of the squashed colour photo over its patch (the patch
    ``hint_planes`` will cover); its point is given in the input's pixels (``input_size``), so the
    pipeline places it exactly there.
    """
    small = colour.convert("RGB").resize((network_size, network_size), Image.Resampling.BILINEAR)
    ab = rgb_to_lab(to_tensor(small))[1:]
    width, height = input_size
    hints = []
    for _ in range(count):
        cx = int(torch.randint(0, network_size, (), generator=generator))
        cy = int(torch.randint(0, network_size, (), generator=generator))
        side = int(torch.randint(sizes[0], sizes[1] + 1, (), generator=generator))
        point = Hint((cx + 0.5) * width / network_size, (cy + 0.5) * height / network_size,
                     0.0, 0.0, side)  # fmt: skip
        top, bottom, left, right = patch_bounds(point, width, height, network_size)
        a, b = ab[:, top:bottom, left:right].mean(dim=(1, 2)).tolist()
        hints.append(Hint(point.x, point.y, a, b, side))
    return hints


def hinted_input(
    l_norm: torch.Tensor, hint_ab_norm: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """InstColorization's network input with hints: [L, ab / 110, mask - mask_cent (0.5)], so
    +0.5 where hinted and -0.5 elsewhere (spec §2.5; all zeros / -0.5 is the automatic input)."""
    return torch.cat((l_norm, hint_ab_norm, mask - INSTCOLOR_MASK_CENT), dim=1)


def hints_in_box(hints: Sequence[Hint], box: Sequence[int]) -> list[Hint]:
    """The hints inside ``box`` (x1, y1, x2, y2 in input pixels, x2 and y2 excluded, as PIL crops
    it) in the crop's own pixels: an instance crop's hints. Points outside the box are left out;
    the colour and the patch side (in the crop's 256x256 network input) are kept."""
    x1, y1, x2, y2 = box
    return [
        Hint(h.x - x1, h.y - y1, h.a, h.b, h.size)
        for h in hints
        if x1 <= h.x < x2 and y1 <= h.y < y2
    ]


def instcolor_hint_planes(
    hints: Sequence[Hint], width: int, height: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, S, S) hint ab / 110 and (1, S, S) 0/1 mask: what :func:`hinted_input` takes, as
    :func:`sample_hints` gives it in training (the same normalisation, the same mask)."""
    ab, mask = hint_planes(hints, width, height, size)
    return ab / AB_NORM, mask
