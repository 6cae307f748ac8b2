"""Zhao et al., Pixelated Semantic Colorization (IJCV 2019): networks, likelihood and sampling.

No code or weights are published; this is built from the paper (``../shared/papers/``).

* ``EmbeddingTrunk`` + ``ColourEmbeddingTop`` are Table 1 (the colour embedding f, 160 channels at
  1/4 of the 128 x 128 input); ``EmbeddingTrunk`` + ``SegmentationTop`` are Table 2 (the
  segmentation head h, ASPP with dilations 6/12/18 summed). The shared ("gray") rows are taken to
  be the first eight, up to and including the first three dilation-2 residual blocks: the rows the
  two tables have in common before the branches' own top layers ("The two tasks have different top
  layers for learning the high-level features"). The markdown copy of the paper does not show the
  shading, so this is a reading, stated here and in docs/zhao-pixelated.md.
* ``GatedResidualBlock``: two 3x3 convolutions (dilated where the table says), a skip connection and
  a gate, ``x + a * sigmoid(b)`` with ``(a, b)`` the second convolution's two halves (PixelCNN++'s
  gated ResNet, which the paper cites), ELU before each convolution.
* ``PixelGenerator`` is the conditional PixelCNN g over the 32 x 32 ab grid (Gated PixelCNN, van den
  Oord et al. 2016, vertical and horizontal stacks, no blind spot), conditioned at every layer by
  1x1 convolutions of ``cat(f, softmax(h))`` - the paper's first (and better) way of using the
  segmentation in the generator. The paper gives no size for g; ``layers`` and ``channels`` are ours.
* The embedding loss and the generator loss are discretised mixtures of 10 logistics over ab
  (PixelCNN++, adapted to two channels: b's mean is linear in a per component); the embedding's
  mixture comes from a 1x1 head on f and is per pixel (not autoregressive).

Sampling (``sample_ab``) is raster order over the low-resolution grid, all images and samples of a
call in one batch, in the incremental form: each row's vertical stack is computed once from the row
above's cached activations, each pixel's horizontal stack at that one position from the cached
left neighbour, and the conditioning terms once per image. ``full_parameters`` is the parallel
(training) computation; the two agree (tests/test_zhao_pixelated.py). Every random number of a
sample comes from that image's seed, drawn before the loop, so a sample does not depend on what
else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.lab import AB_NORM

FILENAME = "zhao_pixelated.pth"
INPUT_SIZE = 128  # the paper's training and test size
DOWNSAMPLE = 4  # f and h are at 1/4 of the input; the generator's ab grid too
EMBEDDING_CHANNELS = 160
MIXTURES = 10
AB_LEVELS = 256  # ab / 110 in [-1, 1], discretised into 256 bins (PixelCNN++'s 8 bits)
PARAMS_PER_MIXTURE = 6  # logit, mean a, mean b, log scale a, log scale b, coefficient b|a
DMOL_CHANNELS = MIXTURES * PARAMS_PER_MIXTURE
COCO_STUFF_CLASSES = 183  # 0 unlabelled / background, 1-182 COCO-Stuff (things 1-91 = COCO ids)
DEFAULT_GENERATOR_LAYERS = 8
DEFAULT_GENERATOR_CHANNELS = 128
MAX_SAMPLES = 8  # per image and request; documented in docs/zhao-pixelated.md
LOG_SCALE_MIN = -7.0


# -- Tables 1 and 2 ---------------------------------------------------------------------------


class GatedResidualBlock(nn.Module):
    """``x + a * sigmoid(b)``, ``(a, b) = conv2(elu(conv1(elu(x))))``; 3x3 kernels, dilation d."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv2(F.elu(self.conv1(F.elu(x)))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


@dataclass(frozen=True)
class TableRow:
    """One row of the paper's Tables 1 and 2 (``kind`` conv, res or aspp; ``repeat`` blocks)."""

    kind: str
    resolution: int
    channels: int
    dilation: int = 1
    stride: int = 1
    repeat: int = 1


SHARED_ROWS = (
    TableRow("conv", 128, 64),
    TableRow("res", 128, 64, repeat=2),
    TableRow("conv", 64, 128, stride=2),
    TableRow("res", 64, 128, repeat=2),
    TableRow("conv", 32, 256, stride=2),
    TableRow("res", 32, 256, repeat=2),
    TableRow("conv", 32, 512),
    TableRow("res", 32, 512, dilation=2, repeat=3),
)
COLOUR_ROWS = (
    TableRow("conv", 32, 512),
    TableRow("res", 32, 512, dilation=4, repeat=3),
    TableRow("conv", 32, EMBEDDING_CHANNELS),
)
SEGMENTATION_ROWS = (
    TableRow("conv", 32, 512),
    TableRow("res", 32, 512, dilation=2, repeat=3),
)
ASPP_DILATIONS = (6, 12, 18)


def _rows(
    rows: Sequence[TableRow], in_channels: int, last_linear: bool, divisor: int = 1
) -> nn.Sequential:
    """The rows as modules; ``divisor`` > 1 narrows every row (tests only: not the paper's)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for index, row in enumerate(rows):
        if row.kind == "conv":
            width = row.channels // divisor
            layers.append(nn.Conv2d(channels, width, 3, row.stride, padding=1))
            channels = width
            if not (last_linear and index == len(rows) - 1):
                layers.append(nn.ELU())
        else:
            layers.extend(GatedResidualBlock(channels, row.dilation) for _ in range(row.repeat))
    return nn.Sequential(*layers)


class EmbeddingTrunk(nn.Module):
    """The rows Tables 1 and 2 share: grey (L - 50) / 100 at 128 -> 512 channels at 32."""

    def __init__(self, divisor: int = 1) -> None:
        super().__init__()
        self.layers = _rows(SHARED_ROWS, 1, last_linear=False, divisor=divisor)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        return self.layers(grey)


class ColourEmbeddingTop(nn.Module):
    """Table 1's own rows: 512 -> the 160-channel colour embedding f (linear last convolution)."""

    def __init__(self, divisor: int = 1) -> None:
        super().__init__()
        self.layers = _rows(COLOUR_ROWS, 512 // divisor, last_linear=True, divisor=divisor)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        return self.layers(shared)


class SegmentationTop(nn.Module):
    """Table 2's own rows: a 512 conv, three dilation-2 blocks, ASPP 6/12/18 summed to logits."""

    def __init__(self, classes: int, divisor: int = 1) -> None:
        super().__init__()
        width = 512 // divisor
        self.layers = _rows(SEGMENTATION_ROWS, width, last_linear=False, divisor=divisor)
        self.aspp = nn.ModuleList(
            nn.Conv2d(width, classes, 3, padding=d, dilation=d) for d in ASPP_DILATIONS
        )

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        x = self.layers(shared)
        return torch.stack([conv(x) for conv in self.aspp]).sum(0)


# -- the conditional PixelCNN g ------------------------------------------------------------------


def _down_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1, :]


def _right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """One Gated PixelCNN layer: a vertical (2x3, rows above) and a horizontal (1x2, left) stack.

    The vertical output at row r sees input rows < r only (layer 0 reads the down-shifted ab), so
    the horizontal stack may add it at (r, x) unshifted; the horizontal stack at (r, x) sees row r
    left of x (layer 0 reads the right-shifted ab). Both gates are ``tanh(.) * sigmoid(.)`` with a
    1x1 term from the conditioning; the horizontal stack is residual from layer 1 on.
    """

    def __init__(self, in_channels: int, channels: int, cond_channels: int, residual: bool) -> None:
        super().__init__()
        self.channels = channels
        self.residual = residual
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (2, 3))
        self.horizontal = nn.Conv2d(in_channels, 2 * channels, (1, 2))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.cond_vertical = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)
        self.cond_horizontal = nn.Conv2d(cond_channels, 2 * channels, 1, bias=False)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.vertical(F.pad(v, (1, 1, 1, 0)))
        v_out = self.gate(v_pre + self.cond_vertical(cond))
        h_pre = self.horizontal(F.pad(h, (1, 0, 0, 0))) + self.vertical_to_horizontal(v_pre)
        h_out = self.horizontal_out(self.gate(h_pre + self.cond_horizontal(cond)))
        return v_out, (h + h_out if self.residual else h_out)


class PixelGenerator(nn.Module):
    """g: ab (N, 2, h, w) in [-1, 1] and conditioning (N, C, h, w) -> mixture parameters (N, 60)."""

    def __init__(
        self,
        cond_channels: int,
        layers: int = DEFAULT_GENERATOR_LAYERS,
        channels: int = DEFAULT_GENERATOR_CHANNELS,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            GatedLayer(2 if i == 0 else channels, channels, cond_channels, residual=i > 0)
            for i in range(layers)
        )
        self.out1 = nn.Conv2d(channels, channels, 1)
        self.out2 = nn.Conv2d(channels, DMOL_CHANNELS, 1)

    def gated_layers(self) -> list[GatedLayer]:
        return [layer for layer in self.layers if isinstance(layer, GatedLayer)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.out2(F.elu(self.out1(F.elu(h))))

    def forward(self, ab: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        v, h = _down_shift(ab), _right_shift(ab)
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.head(h)


# -- the whole model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZhaoOutputs:
    embedding: torch.Tensor  # (N, 160, h, w): f
    embedding_params: torch.Tensor  # (N, 60, h, w): the embedding's own mixture (L_emb)
    segmentation: torch.Tensor  # (N, classes, h, w): h's logits (L_seg)
    condition: torch.Tensor  # (N, 160 + classes, h, w): what g is conditioned on


class ZhaoPixelated(nn.Module):
    """f, h and g of the paper's full model (the purple-blue-green flow)."""

    input_size = INPUT_SIZE

    def __init__(
        self,
        classes: int = COCO_STUFF_CLASSES,
        generator_layers: int = DEFAULT_GENERATOR_LAYERS,
        generator_channels: int = DEFAULT_GENERATOR_CHANNELS,
        divisor: int = 1,
    ) -> None:
        super().__init__()
        self.classes = classes
        self.config: dict[str, int] = {
            "classes": classes,
            "generator_layers": generator_layers,
            "generator_channels": generator_channels,
            "divisor": divisor,
        }
        embedding = EMBEDDING_CHANNELS // divisor
        self.trunk = EmbeddingTrunk(divisor)
        self.colour = ColourEmbeddingTop(divisor)
        self.segmentation = SegmentationTop(classes, divisor)
        self.embedding_head = nn.Conv2d(embedding, DMOL_CHANNELS, 1)
        self.generator = PixelGenerator(embedding + classes, generator_layers, generator_channels)

    def condition(self, lightness: torch.Tensor) -> ZhaoOutputs:
        """f, h and g's conditioning from Lab L (N, 1, 128, 128) in 0..100."""
        shared = self.trunk((lightness - 50.0) / 100.0)
        embedding = self.colour(shared)
        segmentation = self.segmentation(shared)
        condition = torch.cat([embedding, torch.softmax(segmentation, dim=1)], dim=1)
        return ZhaoOutputs(embedding, self.embedding_head(embedding), segmentation, condition)

    def full_parameters(self, ab: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The generator's mixture parameters at every pixel of ``ab`` at once (teacher forcing)."""
        return self.generator(ab, condition)

    def predict_ab(self, lightness: torch.Tensor) -> torch.Tensor:
        """One sample per image, seed 0 (``AutomaticColorizer``): Lab ab at the input size.

        The served path is ``models.zhao_pipeline.ZhaoPipeline`` (samples and seeds per image).
        """
        low = sample_ab(self, lightness, [0] * len(lightness), samples=1).ab[:, 0]
        return upsample_ab(low, lightness.shape[-1]) * AB_NORM


def upsample_ab(low: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def low_resolution_ab(ab: torch.Tensor) -> torch.Tensor:
    """Target ab (N, 2, 128, 128) in Lab units -> the generator's grid, in [-1, 1], on the bins."""
    low = F.avg_pool2d(ab / AB_NORM, DOWNSAMPLE).clamp(-1.0, 1.0)
    return quantise(low)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """The nearest of the 256 bin centres ``2 i / 255 - 1``."""
    return torch.round((x + 1.0) * (AB_LEVELS - 1) / 2.0) * 2.0 / (AB_LEVELS - 1) - 1.0


# -- discretised mixture of logistics over (a, b) -------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    logits: torch.Tensor  # (..., K)
    means: torch.Tensor  # (..., 2, K): a and b (b before its a term)
    log_scales: torch.Tensor  # (..., 2, K)
    coeffs: torch.Tensor  # (..., K): b's mean += coeff * a


def split_mixture(params: torch.Tensor) -> Mixture:
    """(N, 60, ...) -> a ``Mixture`` with the parameter axis moved last."""
    p = params.movedim(1, -1)
    k = MIXTURES
    logits = p[..., :k]
    means = p[..., k : 3 * k].unflatten(-1, (2, k))
    log_scales = p[..., 3 * k : 5 * k].unflatten(-1, (2, k)).clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(p[..., 5 * k : 6 * k])
    return Mixture(logits, means, log_scales, coeffs)


def _logistic_bin_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(bin of x) under a logistic, 256 bins on [-1, 1], open edges (PixelCNN++)."""
    centred = x - mean
    inv_s = torch.exp(-log_scale)
    half = 1.0 / (AB_LEVELS - 1)
    plus = inv_s * (centred + half)
    minus = inv_s * (centred - half)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the lowest bin
    log_one_minus_cdf_min = -F.softplus(minus)  # log (1 - sigmoid(minus)): the highest bin
    mid = minus + inv_s * half  # centre
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    inner = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid - math.log((AB_LEVELS - 1) / 2.0),
    )
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, inner)
    )


def mixture_log_prob(params: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """log p(ab) per pixel: params (N, 60, h, w), ab (N, 2, h, w) on the bins -> (N, h, w)."""
    m = split_mixture(params)
    x = ab.movedim(1, -1).unsqueeze(-1)  # (N, h, w, 2, 1)
    a, b = x[..., 0, :], x[..., 1, :]
    mean_a = m.means[..., 0, :]
    mean_b = m.means[..., 1, :] + m.coeffs * a
    log_pa = _logistic_bin_log_prob(a, mean_a, m.log_scales[..., 0, :])
    log_pb = _logistic_bin_log_prob(b, mean_b, m.log_scales[..., 1, :])
    return torch.logsumexp(log_pa + log_pb + torch.log_softmax(m.logits, -1), dim=-1)


def mixture_nll(params: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per pixel and channel, in nats (the L_emb / L_gen loss)."""
    return -mixture_log_prob(params, ab).mean() / 2.0


def sample_mixture(params: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One (a, b) per row from params (B, 60) and uniforms (B, 3): component, a, b; on the bins.

    The component is the inverse CDF of the mixture weights at ``noise[:, 0]``; a and b are
    logistic draws (inverse CDF at ``noise[:, 1:]``), b's mean shifted by coeff * a, quantised.
    """
    m = split_mixture(params)
    probs = torch.softmax(m.logits, dim=-1)
    cdf = probs.cumsum(-1)
    component = torch.searchsorted(cdf, noise[:, 0:1].contiguous() * cdf[:, -1:]).clamp(
        max=MIXTURES - 1
    )

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, component).squeeze(-1)

    u = noise[:, 1:].clamp(1e-5, 1.0 - 1e-5)
    logistic = torch.log(u) - torch.log1p(-u)
    a = quantise(
        (pick(m.means[:, 0]) + torch.exp(pick(m.log_scales[:, 0])) * logistic[:, 0]).clamp(-1, 1)
    )
    mean_b = pick(m.means[:, 1]) + pick(m.coeffs) * a
    b = quantise((mean_b + torch.exp(pick(m.log_scales[:, 1])) * logistic[:, 1]).clamp(-1, 1))
    return torch.stack([a, b], dim=1)


# -- incremental sampling ------------------------------------------------------------------------


@dataclass
class SampleResult:
    """All samples of one call, flat (image 0's samples first); ``counts`` per image."""

    flat_ab: torch.Tensor  # (sum(counts), 2, h, w) in [-1, 1], on the bins
    flat_parameters: torch.Tensor  # (sum(counts), 60, h, w): each pixel's mixture as sampled
    counts: tuple[int, ...]

    def _per_image(self, flat: torch.Tensor) -> torch.Tensor:
        if len(set(self.counts)) != 1:
            raise ValueError(f"images have different sample counts {self.counts}: use image()")
        return flat.unflatten(0, (len(self.counts), self.counts[0]))

    @property
    def ab(self) -> torch.Tensor:
        """(N images, S samples, 2, h, w) when every image has S samples."""
        return self._per_image(self.flat_ab)

    @property
    def parameters(self) -> torch.Tensor:
        return self._per_image(self.flat_parameters)

    def image(self, index: int) -> torch.Tensor:
        """Image ``index``'s samples, (S_i, 2, h, w)."""
        start = sum(self.counts[:index])
        return self.flat_ab[start : start + self.counts[index]]


@dataclass(frozen=True)
class _HorizontalWeights:
    """One layer's horizontal 1x2 and 1x1 convolutions as matrices (in, out) for one pixel."""

    left: torch.Tensor  # the 1x2 kernel's left tap (column x - 1)
    right: torch.Tensor  # its right tap (column x); the bias goes with the link term
    out: torch.Tensor
    out_bias: torch.Tensor

    @staticmethod
    def of(layer: GatedLayer) -> _HorizontalWeights:
        kernel = layer.horizontal.weight[:, :, 0]  # (2C, in, 2)
        assert layer.horizontal_out.bias is not None
        return _HorizontalWeights(
            kernel[:, :, 0].t(),
            kernel[:, :, 1].t(),
            layer.horizontal_out.weight[:, :, 0, 0].t(),
            layer.horizontal_out.bias,
        )


@dataclass(frozen=True)
class _HeadWeights:
    out1: torch.Tensor
    out1_bias: torch.Tensor
    out2: torch.Tensor
    out2_bias: torch.Tensor

    @staticmethod
    def of(gen: PixelGenerator) -> _HeadWeights:
        assert gen.out1.bias is not None
        assert gen.out2.bias is not None
        return _HeadWeights(
            gen.out1.weight[:, :, 0, 0].t(),
            gen.out1.bias,
            gen.out2.weight[:, :, 0, 0].t(),
            gen.out2.bias,
        )


def sample_noise(seed: int, samples: int, grid: int) -> torch.Tensor:
    """The uniforms of one image's ``samples`` draws: (samples, 3, grid, grid), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((samples, 3, grid, grid), generator=generator)


@torch.no_grad()
def sample_ab(
    model: ZhaoPixelated,
    lightness: torch.Tensor,
    seeds: Sequence[int],
    samples: int | Sequence[int] = 1,
) -> SampleResult:
    """``samples`` colourings of each image of ``lightness`` (N, 1, 128, 128), in one batch.

    Image i's draws use ``seeds[i]`` (and ``samples[i]`` when a sequence); sample j of a call with
    more samples is the same as sample j of a call with fewer (same seed). Returns
    low-resolution ab and the per-pixel parameters.
    """
    if len(seeds) != len(lightness):
        raise ValueError(f"{len(lightness)} images but {len(seeds)} seeds")
    counts = tuple([samples] * len(seeds) if isinstance(samples, int) else samples)
    if len(counts) != len(seeds) or min(counts, default=1) < 1:
        raise ValueError(f"samples must be at least 1 per image, got {samples}")
    outputs = model.condition(lightness)
    repeats = torch.tensor(counts, device=lightness.device)
    cond = outputs.condition.repeat_interleave(repeats, dim=0)  # (B = sum(counts), C, h, w)
    batch, _, height, width = cond.shape
    noise = torch.cat([sample_noise(s, n, height) for s, n in zip(seeds, counts, strict=True)])
    noise = noise.to(cond)
    gen = model.generator
    layers = gen.gated_layers()
    # Conditioning terms: one 1x1 convolution per layer and stack, once for the whole grid.
    cond_v = [layer.cond_vertical(cond) for layer in layers]
    cond_h = [layer.cond_horizontal(cond) for layer in layers]
    weights = [_HorizontalWeights.of(layer) for layer in layers]
    head = _HeadWeights.of(gen)
    ab = cond.new_zeros((batch, 2, height, width))
    params_out = cond.new_zeros((batch, DMOL_CHANNELS, height, width))
    # v_prev[l]: layer l's vertical input at the previous row (B, C, 1, w), zero above row 0.
    v_prev: list[torch.Tensor] = [cond.new_zeros((batch, 2, 1, width))] + [
        cond.new_zeros((batch, layer.channels, 1, width)) for layer in layers
    ]
    ab_prev_row = cond.new_zeros((batch, 2, 1, width))  # the row above, down-shifted input
    for r in range(height):
        # Vertical stacks of row r: from the row above at every layer (rows < r only).
        v_in_prev, v_in_cur = v_prev[0], ab_prev_row  # layer 0 reads ab rows r-2, r-1
        link: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = [ab_prev_row]
        for i, layer in enumerate(layers):
            stacked = torch.cat([v_in_prev, v_in_cur], dim=2)
            v_pre = F.conv2d(
                F.pad(stacked, (1, 1, 0, 0)), layer.vertical.weight, layer.vertical.bias
            )
            v_out = layer.gate(v_pre + cond_v[i][:, :, r : r + 1])
            horizontal_bias = layer.horizontal.bias
            assert horizontal_bias is not None
            link.append(
                layer.vertical_to_horizontal(v_pre)
                + cond_h[i][:, :, r : r + 1]
                + horizontal_bias[:, None, None]
            )
            new_v.append(v_out)
            v_in_prev, v_in_cur = v_prev[i + 1], v_out
        # Horizontal stacks of row r, one pixel at a time from the cached left neighbour, as
        # matrix products on (B, C) vectors: h_row[l][c + 1] is layer l's input at column c (row
        # 0 is the left zero pad); layer 0's input is the right-shifted ab: h_row[0][c + 2] = ab[c].
        h_row = [cond.new_zeros((width + 1, batch, 2))] + [
            cond.new_zeros((width + 1, batch, layer.channels)) for layer in layers
        ]
        links = [t[:, :, 0].permute(2, 0, 1).contiguous() for t in link]  # (w, B, 2C)
        for x in range(width):
            h = h_row[0][x]
            for i, (layer, w) in enumerate(zip(layers, weights, strict=True)):
                cur = h_row[i][x + 1]
                h_pre = torch.addmm(links[i][x], h_row[i][x], w.left) + cur @ w.right
                a, b = h_pre.chunk(2, dim=1)
                h = torch.addmm(w.out_bias, torch.tanh(a) * torch.sigmoid(b), w.out)
                if layer.residual:
                    h = h + cur
                h_row[i + 1][x + 1] = h
            params = torch.addmm(
                head.out2_bias, F.elu(torch.addmm(head.out1_bias, F.elu(h), head.out1)), head.out2
            )
            params_out[:, :, r, x] = params
            value = sample_mixture(params, noise[:, :, r, x])
            ab[:, :, r, x] = value
            if x + 2 <= width:
                h_row[0][x + 2] = value
        ab_prev_row = ab[:, :, r : r + 1]
        v_prev = new_v
    return SampleResult(ab, params_out, counts)


# -- loading -------------------------------------------------------------------------------------


def model_config(model: ZhaoPixelated) -> dict[str, int]:
    """What ``build_zhao_pixelated`` needs to rebuild ``model`` (stored in its weight file)."""
    return dict(model.config)


def save_zhao_pixelated(model: ZhaoPixelated, path: Path) -> None:
    """The weight file: ``{"config": ..., "state_dict": ...}``, written atomically."""
    from models.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config": model_config(model), "state_dict": model.state_dict()}
    write_atomic(path, lambda handle: torch.save(data, handle))


def build_zhao_pixelated(config: Mapping[str, int] | None = None) -> ZhaoPixelated:
    config = dict(config or {})
    return ZhaoPixelated(
        classes=config.get("classes", COCO_STUFF_CLASSES),
        generator_layers=config.get("generator_layers", DEFAULT_GENERATOR_LAYERS),
        generator_channels=config.get("generator_channels", DEFAULT_GENERATOR_CHANNELS),
        divisor=config.get("divisor", 1),
    )


def load_zhao_pixelated(path: Path, map_location: str | torch.device = "cpu") -> ZhaoPixelated:
    """A file written by ``train --model zhao-pixelated``: ``{"config": ..., "state_dict": ...}``.

    Strict: missing, unexpected or wrongly shaped keys are a ``CheckpointError`` naming the file.
    """
    from models.checkpoints import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"{path}: missing (no official weights exist: train them)")
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"{path}: not a zhao-pixelated file (no 'state_dict')")
    config = {k: int(v) for k, v in dict(data.get("config", {})).items()}
    model = build_zhao_pixelated(config)
    expected = model.state_dict()
    state = data["state_dict"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: state dict does not match zhao-pixelated {config}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()
