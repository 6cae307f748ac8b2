"""Li, Zeng, Xiao, Wang, *The Instance-Aware Automatic Image Colorization Based on Deep
Convolutional Neural Network* (Intelligent Automation & Soft Computing, 2020): ``li-dcnn``.

No code or weights are published; this is the network as the paper describes it (its §2 and
Figure 2), on the ECCV16 trunk it is initialised from:

* ``model1`` ... ``model5`` (conv1-conv5): the ECCV16 trunk, module for module
  (``models.zhang_eccv16._block``): 256x256 L in, 512 channels at 1/8 (32x32) out.
* The classification branch after conv5: ``class_pool`` (the paper's "down sample" halving height
  and width: 2x2 max pooling, 32x32 -> 16x16), three fully connected layers ``fc1`` ``fc2``
  ``fc3`` with ReLU, and the ``classifier`` (a linear layer to the image classes, trained with
  cross-entropy). The paper gives no widths; these are Iizuka et al.'s global-feature widths
  (1024, 512, 256), the network the paper takes the idea from. Because the branch is fully
  connected, the input must be 256x256 (what the product always feeds a zoo model).
* fc3 (256 values) tiled over the 32x32 conv5 grid and concatenated to conv5: 768 channels.
* ``model6`` ``model7`` (conv6, conv7: ECCV16's; conv6's first convolution takes the 768 channels),
  ``model8`` (conv8: ECCV16's stride-2 transposed conv and two 3x3 convs), ``model9`` (conv9: the
  1x1 conv to 313 bin logits at 1/4 of the input size, ECCV16's ``model8.6``).
* ``model_out``: ECCV16's fixed 1x1 conv 313 -> 2 whose weight holds the bins' ab centres / 110
  (copied from the Zhang file with ``--init``; the grid rule of :func:`grid_bin_centres` without).

Decoding as ECCV16's paper: the annealed mean softmax(z / T), expectation over the bin centres,
bilinear x4, x110, with T = 0.38 (ECCV16's value; Li et al. state none) by default.

``divisor`` > 1 narrows every layer by that factor (channels 64 / D ... 512 / D, fully connected
widths 1024 / D ...): not the paper, a network for tests and quick runs (``train --width-divisor``);
the weights file's shapes give it back when loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import CheckpointError, load_strict, read_state_dict
from models.lab import AB_NORM, normalize_l
from models.zhang_eccv16 import (
    NUM_BINS,
    _block,
    annealed_mean_ab,
    check_input,
    check_temperature,
    decode_each,
)

FILENAME = "li_dcnn.pth"
INPUT_SIZE = 256
CONV5_GRID = INPUT_SIZE // 8  # 32: three stride-2 convs
POOLED_GRID = CONV5_GRID // 2  # 16: the branch's "down sample by 50%"
FC_WIDTHS = (1024, 512, 256)  # Iizuka et al.'s global features (fc3 = the instance feature)
DETECTOR_CLASSES = 91  # torchvision's COCO label space; 0 = no object detected (the default)
DEFAULT_TEMPERATURE = 0.38
GRID_STEP = 10.0
GRID_RANGE = 110.0


class LiDCNN(nn.Module):
    """``logits`` -> (313-bin logits, class logits); ``predict_ab`` maps Lab L to Lab ab."""

    input_size = INPUT_SIZE
    decodes_by_annealed_mean = True  # ``predict_ab_each``: a temperature per image

    def __init__(
        self,
        num_classes: int = DETECTOR_CLASSES,
        temperature: float = DEFAULT_TEMPERATURE,
        divisor: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if divisor < 1 or 64 % divisor:
            raise ValueError(f"divisor must divide 64, got {divisor}")
        self.num_classes = num_classes
        self.divisor = divisor
        c1, c2, c3, c4 = (c // divisor for c in (64, 128, 256, 512))
        self.model1 = _block(1, c1, 2, last_stride=2)
        self.model2 = _block(c1, c2, 2, last_stride=2)
        self.model3 = _block(c2, c3, 3, last_stride=2)
        self.model4 = _block(c3, c4, 3)
        self.model5 = _block(c4, c4, 3, dilation=2)
        self.class_pool = nn.MaxPool2d(2)
        w1, w2, w3 = (w // divisor for w in FC_WIDTHS)
        self.fc1 = nn.Linear(c4 * POOLED_GRID * POOLED_GRID, w1)
        self.fc2 = nn.Linear(w1, w2)
        self.fc3 = nn.Linear(w2, w3)
        self.classifier = nn.Linear(w3, num_classes)
        self.model6 = _block(c4 + w3, c4, 3, dilation=2)
        self.model7 = _block(c4, c4, 3)
        self.model8 = nn.Sequential(
            nn.ConvTranspose2d(c4, c3, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.model9 = nn.Conv2d(c3, NUM_BINS, 1)
        self.model_out = nn.Conv2d(NUM_BINS, 2, 1, bias=False)
        self.model_out.requires_grad_(False)  # the bin centres: data, never trained
        self.temperature = check_temperature(temperature)

    def trunk(self, l_norm: torch.Tensor) -> torch.Tensor:
        """conv1-conv5: (N, 1, 256, 256) -> (N, 512, 32, 32)."""
        x = l_norm
        for block in (self.model1, self.model2, self.model3, self.model4, self.model5):
            x = block(x)
        return x

    def instance_feature(self, conv5: torch.Tensor) -> torch.Tensor:
        """The classification branch up to fc3: (N, 512, 32, 32) -> (N, 256)."""
        x = torch.flatten(self.class_pool(conv5), 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.relu(self.fc3(x))

    def logits(self, l_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, 256, 256) normalised L -> (N, 313, 64, 64) bin logits, (N, classes) logits."""
        conv5 = self.trunk(l_norm)
        fc3 = self.instance_feature(conv5)
        tiled = fc3[:, :, None, None].expand(-1, -1, conv5.shape[2], conv5.shape[3])
        x = torch.cat([conv5, tiled], dim=1)
        for block in (self.model6, self.model7, self.model8):
            x = block(x)
        return self.model9(x), self.classifier(fc3)

    def decode(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Bin logits -> Lab ab at 4x their size: softmax(z / T), expectation, bilinear x4, x110."""
        t = self.temperature if temperature is None else check_temperature(temperature)
        return annealed_mean_ab(self.model_out, logits, t)

    def predict_ab(self, lightness: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """(N, 1, 256, 256) Lab L (0..100) -> (N, 2, 256, 256) ab."""
        bins = self._bins(lightness)
        return self.decode(bins, temperature)

    def predict_ab_each(
        self, lightness: torch.Tensor, temperatures: Sequence[float | None]
    ) -> torch.Tensor:
        """``predict_ab`` with a temperature per image (None: the model's default); the network
        runs once on the whole batch."""
        return decode_each(self.decode, self._bins(lightness), temperatures)

    def _bins(self, lightness: torch.Tensor) -> torch.Tensor:
        check_input(lightness, "LiDCNN")
        if tuple(lightness.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"LiDCNN: the classification branch is fully connected, so L must be "
                f"{INPUT_SIZE}x{INPUT_SIZE}, got {lightness.shape[-2]}x{lightness.shape[-1]}"
            )
        bins, _ = self.logits(normalize_l(lightness))
        return bins

    def forward(self, x: torch.Tensor, *, logits_only: bool = False) -> Any:
        """``predict_ab(x)``, or with ``logits_only`` ``logits(x)`` (training, through DDP)."""
        return self.logits(x) if logits_only else self.predict_ab(x)

    def bin_centres(self) -> torch.Tensor:
        """(313, 2) ab centres of the bins, in ab units (what ``model_out`` holds / 110)."""
        return self.model_out.weight[:, :, 0, 0].t() * AB_NORM


@lru_cache(maxsize=1)
def grid_bin_centres() -> torch.Tensor:
    """(313, 2) ab centres: the 313 cells of the 10-unit grid on [-110, 110]^2 nearest the gamut.

    ECCV16's 313 in-gamut centres (``pts_in_hull.npy``) are shipped with its code, not with its
    weights file; its weights file holds them in ``model_out`` and ``--init`` copies them from
    there. Without a Zhang file the centres are this rule: every cell of the 23 x 23 grid ranked by
    the Chebyshev distance from its centre to the nearest sRGB colour (a 48^3 sweep of the cube,
    in Lab), the 313 nearest kept (ties broken by grid order), in grid order.
    """
    from models.lab import rgb_to_lab

    v = torch.linspace(0.0, 1.0, 48)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(3, -1, 1)
    gamut = torch.unique(torch.round(rgb_to_lab(cube)[1:].reshape(2, -1)), dim=1).double()
    steps = torch.arange(-GRID_RANGE, GRID_RANGE + 1, GRID_STEP, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="ij")).reshape(2, -1)  # (2, 529)
    distance = (grid[:, :, None] - gamut[:, None, :]).abs().amax(dim=0).amin(dim=1)  # (529,)
    order = sorted(range(grid.shape[1]), key=lambda i: (float(distance[i]), i))[:NUM_BINS]
    return grid[:, sorted(order)].t().float().contiguous()


def set_bin_centres(network: LiDCNN, centres: torch.Tensor) -> None:
    """Write (313, 2) ab centres into ``model_out`` (as ECCV16 holds them: / 110)."""
    if tuple(centres.shape) != (NUM_BINS, 2):
        raise ValueError(f"expected (313, 2) bin centres, got {tuple(centres.shape)}")
    with torch.no_grad():
        network.model_out.weight.copy_((centres.t() / AB_NORM)[:, :, None, None])


def num_classes_of(state: dict[str, torch.Tensor], path: str) -> int:
    """The class count a weights file was trained with (its classifier's rows)."""
    weight = state.get("classifier.weight")
    if weight is None or weight.dim() != 2:
        raise CheckpointError(f"{path}: no classifier.weight; not a li-dcnn file")
    return int(weight.shape[0])


def divisor_of(state: dict[str, torch.Tensor], path: str) -> int:
    """The width divisor a weights file was trained with (conv1's 64 / its output channels)."""
    weight = state.get("model1.0.weight")
    if weight is None or weight.dim() != 4 or not 0 < weight.shape[0] <= 64:
        raise CheckpointError(f"{path}: no usable model1.0.weight; not a li-dcnn file")
    return 64 // int(weight.shape[0])


def load_li_dcnn(
    path: Path | str,
    map_location: str | torch.device = "cpu",
    temperature: float = DEFAULT_TEMPERATURE,
) -> LiDCNN:
    """A ``train --model li-dcnn`` weights file, strictly, in eval mode."""
    path = Path(path)
    state = read_state_dict(path, map_location)
    network = LiDCNN(num_classes_of(state, str(path)), temperature, divisor_of(state, str(path)))
    load_strict(network, state, str(path))
    return network.eval().requires_grad_(False)
