"""Zhang, Isola, Efros, *Colorful Image Colorization* (ECCV 2016): the 313-bin network on L.

Module names and Sequential indices are those of the authors' PyTorch release
(``colorizers/eccv16.py``), so its ``colorization_release_v2-9b330a0b.pth`` (82 entries, 32.2 M
parameters) loads strictly. ``model1`` ... ``model7`` are conv + ReLU blocks ending in BatchNorm
(the last conv of blocks 1-3 has stride 2; blocks 5 and 6 are dilated by 2); ``model8`` is a
stride-2 transposed conv, two 3x3 convs and a 1x1 conv to 313 logits at 1/4 of the input size.

Decoding, as the release does it: softmax over the 313 bins, ``model_out`` (a 1x1 conv 313 -> 2
without bias: its weight holds the bins' ab centres in units of 1/110, so this is the softmax
expectation), bilinear x4 upsampling (``align_corners=False``), x110.

Temperature. The paper's annealed mean is softmax(z / T) with T = 0.38; the original Caffe deploy
file applies it as a Scale layer of 2.606 (= 1 / 0.38) before the softmax. The PyTorch release has
no such step, and whether the factor is folded into the released weights is undocumented.
``temperature`` here divides the logits: T = 1 (the default) *is* the PyTorch release's
behaviour; T = 0.38 applies the paper's rule on top of the released logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import load_strict, read_state_dict
from models.lab import AB_NORM, normalize_l

FILENAME = "colorization_release_v2-9b330a0b.pth"
NUM_BINS = 313
RELEASE_TEMPERATURE = 1.0
PAPER_TEMPERATURE = 0.38
INPUT_SIZE = 256
SIZE_MULTIPLE = 8  # three stride-2 convs, one x2 transposed conv and the x4 upsampling


def _block(
    c_in: int, c_out: int, convs: int, *, last_stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    """``convs`` x (3x3 conv + ReLU), then BatchNorm; the last conv may have stride 2."""
    layers: list[nn.Module] = []
    for i in range(convs):
        stride = last_stride if i == convs - 1 else 1
        conv = nn.Conv2d(
            c_in if i == 0 else c_out, c_out, 3, stride=stride, padding=dilation, dilation=dilation
        )
        layers += [conv, nn.ReLU()]
    layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers)


def annealed_mean_ab(
    model_out: nn.Module, logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ECCV16's decoding: softmax(z / T), the expectation over the bin centres (``model_out``,
    a fixed 1x1 conv), bilinear x4, x110. z / 1.0 is exact: T = 1 is bit-identical to the
    release's softmax(z)."""
    ab_norm = model_out(torch.softmax(logits / temperature, dim=1))
    up = F.interpolate(ab_norm, scale_factor=4, mode="bilinear", align_corners=False)
    return up * AB_NORM


def decode_each(
    decode: Callable[[torch.Tensor, float | None], torch.Tensor],
    logits: torch.Tensor,
    temperatures: Sequence[float | None],
) -> torch.Tensor:
    """Each image's ab at its own temperature (None: the model's default): one ``decode`` per
    distinct temperature, on that temperature's rows; a batch with one temperature is decoded
    whole, exactly as ``decode(logits, t)``."""
    if len(temperatures) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} images but {len(temperatures)} temperatures")
    distinct = list(dict.fromkeys(temperatures))
    if len(distinct) == 1:
        return decode(logits, distinct[0])
    parts: list[torch.Tensor] = []
    order: list[int] = []
    for t in distinct:
        rows = [i for i, x in enumerate(temperatures) if x == t]
        parts.append(decode(logits[rows], t))
        order += rows
    stacked = torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return stacked[inverse.to(stacked.device)]


class ZhangECCV16(nn.Module):
    """The release's ``ECCVGenerator``; ``predict_ab`` maps Lab L to Lab ab at the input size."""

    input_size = INPUT_SIZE
    decodes_by_annealed_mean = True  # ``predict_ab_each``: a temperature per image

    def __init__(self, temperature: float = RELEASE_TEMPERATURE) -> None:
        super().__init__()
        self.model1 = _block(1, 64, 2, last_stride=2)
        self.model2 = _block(64, 128, 2, last_stride=2)
        self.model3 = _block(128, 256, 3, last_stride=2)
        self.model4 = _block(256, 512, 3)
        self.model5 = _block(512, 512, 3, dilation=2)
        self.model6 = _block(512, 512, 3, dilation=2)
        self.model7 = _block(512, 512, 3)
        self.model8 = nn.Sequential(
            nn.ConvTranspose2d(512, 256, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, NUM_BINS, 1),
        )  # fmt: skip
        self.model_out = nn.Conv2d(NUM_BINS, 2, 1, bias=False)
        self.temperature = check_temperature(temperature)

    def logits(self, l_norm: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) normalised L -> (N, 313, H/4, W/4) bin logits."""
        x = l_norm
        for block in (self.model1, self.model2, self.model3, self.model4,
                      self.model5, self.model6, self.model7, self.model8):  # fmt: skip
            x = block(x)
        return x

    def decode(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Bin logits -> Lab ab at 4x their size: softmax(z / T), expectation, bilinear x4, x110."""
        t = self.temperature if temperature is None else check_temperature(temperature)
        return annealed_mean_ab(self.model_out, logits, t)

    def predict_ab(self, lightness: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """(N, 1, H, W) Lab L (0..100; H, W multiples of 8, 256 as trained) -> (N, 2, H, W) ab."""
        check_input(lightness, "ZhangECCV16")
        return self.decode(self.logits(normalize_l(lightness)), temperature)

    def predict_ab_each(
        self, lightness: torch.Tensor, temperatures: Sequence[float | None]
    ) -> torch.Tensor:
        """``predict_ab`` with a temperature per image (None: the model's default); the network
        runs once on the whole batch."""
        check_input(lightness, "ZhangECCV16")
        return decode_each(self.decode, self.logits(normalize_l(lightness)), temperatures)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        return self.predict_ab(lightness)


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0.0 or t == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_input(lightness: torch.Tensor, model: str) -> None:
    if lightness.dim() != 4 or lightness.shape[1] != 1:
        raise ValueError(f"{model}: expected L as (N, 1, H, W), got {tuple(lightness.shape)}")
    h, w = lightness.shape[-2:]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise ValueError(f"{model}: H and W must be multiples of {SIZE_MULTIPLE}, got {h}x{w}")


def load_zhang_eccv16(
    path: Path | str,
    map_location: str | torch.device = "cpu",
    temperature: float = RELEASE_TEMPERATURE,
) -> ZhangECCV16:
    """``colorization_release_v2-9b330a0b.pth`` (or a file in its layout), strictly, in eval mode."""
    path = Path(path)
    state = read_state_dict(path, map_location)
    network = ZhangECCV16(temperature)
    load_strict(network, state, str(path))  # CheckpointError naming the file and the keys
    return network.eval().requires_grad_(False)
