"""Zhang et al., *Real-Time User-Guided Image Colorization* (SIGGRAPH 2017), automatic mode.

The released ``siggraph17-df00044c.pth`` has the 107 state-dict entries of InstColorization's
full-image network, so it loads strictly into :class:`models.networks.FullImageGenerator` (one copy
of the network code). What differs is the input convention of that file: the release's
``SIGGRAPHGenerator.forward`` feeds ``cat((L - 50) / 100, ab / 110, mask)`` with ab = 0 and
**mask = 0** where there is no hint. InstColorization's retrained weights instead see
``mask - mask_cent`` (-0.5 for "no hint"); that convention is *not* used here.

The output is ``model_out`` (1x1 conv + tanh) x 110 at the input size: no upsampling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.checkpoints import load_strict, read_state_dict
from models.lab import AB_NORM, normalize_l
from models.networks import FullImageGenerator
from models.zhang_eccv16 import check_input

FILENAME = "siggraph17-df00044c.pth"
INPUT_SIZE = 256
NO_HINT_MASK = 0.0  # this file's "no hint" value (InstColorization's would be -0.5)
HINT_MASK = 1.0  # this file's value where a hint is (InstColorization's would be +0.5)


class ZhangSIGGRAPH17(nn.Module):
    """The released SIGGRAPH 2017 weights in the shared generator; ``predict_ab``: L -> ab."""

    input_size = INPUT_SIZE
    takes_hints = True  # models.automatic.AutomaticPipeline passes colour hints to predict_ab
    hint_mask_values = (HINT_MASK, NO_HINT_MASK)  # the mask channel: (hinted, not hinted)

    def __init__(self, generator: FullImageGenerator | None = None) -> None:
        super().__init__()
        self.generator = generator if generator is not None else FullImageGenerator(64)

    def network_input(
        self,
        lightness: torch.Tensor,
        ab_hints: torch.Tensor | None = None,
        hint_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, 4, H, W): normalised L, hint ab / 110 (0: none), hint mask (1 hint, 0 none)."""
        n, _, h, w = lightness.shape
        if ab_hints is None:
            ab_hints = lightness.new_zeros((n, 2, h, w))
        if hint_mask is None:
            hint_mask = lightness.new_full((n, 1, h, w), NO_HINT_MASK)
        return torch.cat((normalize_l(lightness), ab_hints / AB_NORM, hint_mask), dim=1)

    def predict_ab(
        self,
        lightness: torch.Tensor,
        ab_hints: torch.Tensor | None = None,
        hint_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, 1, H, W) Lab L (H, W multiples of 8, 256 as trained) -> (N, 2, H, W) Lab ab.

        Automatic mode by default; ``ab_hints`` (Lab units) and ``hint_mask`` follow the release.
        """
        check_input(lightness, "ZhangSIGGRAPH17")
        x = self.network_input(lightness, ab_hints, hint_mask)
        return self.generator(x) * AB_NORM

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        return self.predict_ab(lightness)


def load_zhang_siggraph17(
    path: Path | str, map_location: str | torch.device = "cpu"
) -> ZhangSIGGRAPH17:
    """``siggraph17-df00044c.pth`` (or a file in its layout), strictly, in eval mode."""
    path = Path(path)
    state = read_state_dict(path, map_location)
    generator = FullImageGenerator(64)
    load_strict(generator, state, str(path))  # CheckpointError naming the file and the keys
    return ZhangSIGGRAPH17(generator).eval().requires_grad_(False)
