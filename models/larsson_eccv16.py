"""Larsson, Maire, Shakhnarovich, *Learning Representations for Automatic Colorization* (ECCV 2016).

The network of the authors' release (gustavla/autocolorize, ``res/autocolorize.prototxt.template``):
VGG-16 ``conv1_1`` ... ``conv5_3`` (3x3, pad 1, ReLU in place; max pool 2/2 after each block, the
first conv on one grey channel), ``fc6`` a 7x7 conv to 4096 (pad 3) on ``pool5``, ``fc7`` a 1x1 conv
to 4096, both with ReLU (dropout is off at inference). A hypercolumn at 1/4 of the input size
concatenates ``data``, ``conv1_x`` (average pool 4/4), ``conv2_x`` (average pool 2/2), ``conv3_x``,
``conv4_x`` (bilinear deconv k4 s2 p1), ``conv5_x`` (k8 s4 p2), ``fc6`` and ``fc7`` (k16 s8 p4):
12,417 channels. ``h_fc1`` (1x1 to 1024, ReLU), ``prediction_h`` and ``prediction_c`` (1x1 to 32
bins), softmax, then a bilinear deconv x4 (k8 s4 p2) of each histogram. The fixed deconvolutions
are Caffe's bilinear filler applied per channel; they are buffers, not part of the state dict.

State-dict keys are the Caffe layer names: ``conv1_1.weight``, ``conv1_1.bias`` ... ``h_fc1``,
``prediction_h``, ``prediction_c`` (36 entries, 147,041,024 parameters).
:func:`convert_caffe_hdf5` writes them from ``autocolorize.caffemodel.h5`` (``/data/<layer>/0``
weight, ``/1`` bias) with h5py; no Caffe is needed.

Decoding (``calc_rgb_from_hue_chroma``, the release's defaults: median chroma, expectation hue with
chromatic fading): chroma = the median bin centre of the chroma histogram; hue = the circular mean
of the hue histogram, the chroma multiplied by clip(|mean resultant|, 0, 0.03) / 0.03; then HSV with
V = grey + c/2 and S = 2c / (2 grey + c), HSV -> RGB (scikit-image's formulas), clipped, and the
lightness matched to the input grey (rgb - mean(rgb) + grey, clipped to [0, 1]).

Input and resizing. The release feeds the grey (mean of RGB) in [0, 1], no mean subtracted, into a
network of size S = 512: the image is scaled so its shorter side is at most S/2 and its longer side
below S - 12, centre-padded with zeros to S x S, and the output cropped and scaled back. The product
hands ``predict_ab`` Lab L at ``input_size`` = S/2 = 256 (the pipeline's fixed square input), so the
scale is 1: the image is only centre-padded into 512 x 512 and cropped back, exactly the release's
rule for a 256 x 256 image. Other sizes are scaled with bilinear interpolation (the release uses
scikit-image's resampler; that path is not bit-faithful). Deviations, stated: the grey is L / 100
(what the product has; the release uses the RGB mean), S = 0 where 2 grey + c = 0 (the release
divides by zero there), and the RGB result is returned as Lab ab so the product's merge puts it
under the original L at full resolution.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.atomic import write_atomic
from models.checkpoints import CheckpointError, load_strict, read_state_dict
from models.lab import rgb_to_lab

FILENAME = "autocolorize.pth"  # the converted state dict
SOURCE_FILENAME = "autocolorize.caffemodel.h5"
SOURCE_URL = "http://people.cs.uchicago.edu/~larsson/colorization/res/autocolorize.caffemodel.h5"
SOURCE_SIZE = 588_203_256
NETWORK_SIZE = 512  # the release's default input size (a multiple of 32)
INPUT_SIZE = NETWORK_SIZE // 2
NUM_BINS = 32
FADE_THRESHOLD = 0.03

# (name, in, out, kernel, pad) of the learnt layers, in the prototxt's order.
VGG_BLOCKS = ((1, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))
HYPERCOLUMN_CHANNELS = 1 + 2 * 64 + 2 * 128 + 3 * 256 + 3 * 512 + 3 * 512 + 2 * 4096  # 12,417
# The fixed bilinear deconvolutions the Caffe file may also hold: layer name -> kernel size.
FIXED_DECONVS = {
    **{f"conv4_{i}_full_reshaped": 4 for i in (1, 2, 3)},
    **{f"conv5_{i}_full_reshaped": 8 for i in (1, 2, 3)},
    "fc6_full_reshaped": 16,
    "fc7_full_reshaped": 16,
    "prediction_h_full_reshaped": 8,
    "prediction_c_full_reshaped": 8,
}


def _layers() -> list[tuple[str, int, int, int, int]]:
    layers = []
    for block, (c_in, c_out, convs) in enumerate(VGG_BLOCKS, start=1):
        for i in range(1, convs + 1):
            layers.append((f"conv{block}_{i}", c_in if i == 1 else c_out, c_out, 3, 1))
    layers += [("fc6", 512, 4096, 7, 3), ("fc7", 4096, 4096, 1, 0)]
    layers += [("h_fc1", HYPERCOLUMN_CHANNELS, 1024, 1, 0)]
    layers += [("prediction_h", 1024, NUM_BINS, 1, 0), ("prediction_c", 1024, NUM_BINS, 1, 0)]
    return layers


LAYERS = tuple(_layers())


def bilinear_kernel(size: int) -> torch.Tensor:
    """Caffe's ``bilinear`` filler for a (size x size) deconvolution kernel."""
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    x = torch.arange(size, dtype=torch.float64)
    line = 1 - torch.abs(x / f - c)
    return (line[:, None] * line[None, :]).float()


class LarssonECCV16(nn.Module):
    """The hypercolumn network and the release's decoding; ``predict_ab`` maps Lab L to Lab ab."""

    def __init__(self, network_size: int = NETWORK_SIZE) -> None:
        super().__init__()
        if network_size % 32:
            raise ValueError(f"network_size must be a multiple of 32, got {network_size}")
        self.network_size = network_size
        self.input_size = network_size // 2
        for name, c_in, c_out, k, pad in LAYERS:
            self.add_module(name, nn.Conv2d(c_in, c_out, k, padding=pad))
        for k in (4, 8, 16):
            self.register_buffer(f"bilinear{k}", bilinear_kernel(k)[None, None], persistent=False)

    def layer(self, name: str) -> nn.Conv2d:
        """One learnt layer by its Caffe name."""
        return cast(nn.Conv2d, self.get_submodule(name))

    def _up(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Per-channel fixed bilinear deconvolution: k4 s2 p1, k8 s4 p2 or k16 s8 p4."""
        weight = getattr(self, f"bilinear{k}").to(x.dtype).expand(x.shape[1], 1, k, k)
        return F.conv_transpose2d(x, weight, stride=k // 2, padding=k // 4, groups=x.shape[1])

    def histograms(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, S, S) grey in [0, 1] -> hue and chroma histograms, (N, 32, S, S) each."""
        x = grey
        columns = [F.avg_pool2d(grey, 4)]
        for block, (_, _, convs) in enumerate(VGG_BLOCKS, start=1):
            for i in range(1, convs + 1):
                x = F.relu(self.layer(f"conv{block}_{i}")(x))
                if block == 1:
                    columns.append(F.avg_pool2d(x, 4))
                elif block == 2:
                    columns.append(F.avg_pool2d(x, 2))
                elif block == 3:
                    columns.append(x)
                else:
                    columns.append(self._up(x, 4 if block == 4 else 8))
            x = F.max_pool2d(x, 2)
        x = F.relu(self.layer("fc6")(x))
        columns.append(self._up(x, 16))
        x = F.relu(self.layer("fc7")(x))
        columns.append(self._up(x, 16))
        h = F.relu(self.layer("h_fc1")(torch.cat(columns, dim=1)))
        hist_h = self._up(torch.softmax(self.layer("prediction_h")(h), dim=1), 8)
        hist_c = self._up(torch.softmax(self.layer("prediction_c")(h), dim=1), 8)
        return hist_h, hist_c

    def predict_ab(self, lightness: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) Lab L (0..100; ``input_size`` square as served) -> (N, 2, H, W) fp32 ab.

        The network runs in the input's (and the model's) dtype and memory format; the decoding
        always in fp32.
        """
        if lightness.dim() != 4 or lightness.shape[1] != 1:
            raise ValueError(
                f"LarssonECCV16: expected L as (N, 1, H, W), got {tuple(lightness.shape)}"
            )
        h, w = lightness.shape[-2:]
        s = self.network_size
        scale = resize_scale(h, w, s)
        grey = lightness / 100.0  # in the pipeline's dtype for the network; decoded in fp32
        nh, nw = round(h * scale), round(w * scale)
        if (nh, nw) != (h, w):
            grey = F.interpolate(grey, size=(nh, nw), mode="bilinear", align_corners=False)
        top, left = (s - nh) // 2, (s - nw) // 2
        padded = F.pad(grey, (left, s - nw - left, top, s - nh - top))
        hist_h, hist_c = self.histograms(padded)
        crop = (slice(None), slice(None), slice(top, top + nh), slice(left, left + nw))
        rgb = decode_rgb(hist_h[crop].float(), hist_c[crop].float(), grey.float())
        if (nh, nw) != (h, w):
            rgb = F.interpolate(rgb, size=(h, w), mode="bilinear", align_corners=False)
        return rgb_to_lab(rgb)[:, 1:]

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        return self.predict_ab(lightness)


def resize_scale(h: int, w: int, network_size: int) -> float:
    """The release's rule: shorter side at most S/2, longer side below S - 12."""
    shorter, longer = min(h, w), max(h, w)
    scale = min((network_size // 2) / shorter, 1.0)
    if longer * scale >= network_size - 12:
        scale = (network_size - 12) / longer
    return scale


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) HSV in [0, 1] -> RGB, scikit-image's ``hsv2rgb`` formulas."""
    hue, sat, val = hsv.unbind(1)
    hi = torch.floor(hue * 6)
    f = hue * 6 - hi
    p = val * (1 - sat)
    q = val * (1 - f * sat)
    t = val * (1 - (1 - f) * sat)
    sector = torch.remainder(hi, 6).long()
    choices = torch.stack(
        [
            torch.stack(c, dim=1)
            for c in ((val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q))
        ]
    )  # (6, N, 3, H, W)
    index = sector[None, :, None].expand(1, -1, 3, -1, -1)
    return torch.gather(choices, 0, index)[0]


def decode_rgb(hist_h: torch.Tensor, hist_c: torch.Tensor, grey: torch.Tensor) -> torch.Tensor:
    """Hue and chroma histograms (N, 32, H, W) and grey (N, 1, H, W) -> RGB (N, 3, H, W) in [0, 1]."""
    centres = (torch.arange(NUM_BINS, dtype=hist_h.dtype, device=hist_h.device) + 0.5) / NUM_BINS
    below = (torch.cumsum(hist_c, dim=1) < 0.5).sum(dim=1, keepdim=True)
    chroma = (below.to(hist_c.dtype) + 0.5) / NUM_BINS
    angle = 2 * math.pi * centres.view(1, -1, 1, 1)
    real = (hist_h * torch.cos(angle)).sum(dim=1, keepdim=True)
    imag = (hist_h * torch.sin(angle)).sum(dim=1, keepdim=True)
    hue = torch.remainder(torch.atan2(imag, real) / (2 * math.pi), 1.0)
    resultant = torch.sqrt(real**2 + imag**2) / NUM_BINS  # |mean of the 32 complex terms|
    chroma = chroma * resultant.clamp(0.0, FADE_THRESHOLD) / FADE_THRESHOLD
    val = grey + chroma / 2
    denom = 2 * grey + chroma
    sat = torch.where(denom > 0, 2 * chroma / denom.clamp(min=1e-12), torch.zeros_like(denom))
    hsv = torch.cat((hue, sat, val), dim=1).clamp(0.0, 1.0)
    rgb = hsv_to_rgb(hsv).clamp(0.0, 1.0)
    return (rgb - rgb.mean(dim=1, keepdim=True) + grey).clamp(0.0, 1.0)


def _check_bilinear(name: str, blob: Any, source: str) -> None:
    k = FIXED_DECONVS[name]
    weight = torch.as_tensor(blob[()]).float()
    expected = bilinear_kernel(k)[None, None]
    if tuple(weight.shape) != tuple(expected.shape) or not torch.allclose(
        weight, expected, atol=1e-6
    ):
        raise CheckpointError(
            f"{source}: fixed deconvolution {name} is not the bilinear {k}x{k} kernel "
            f"(shape {tuple(weight.shape)}): not the authors' network"
        )


def caffe_hdf5_state_dict(h5_path: Path | str) -> dict[str, torch.Tensor]:
    """Read ``/data/<layer>/0`` (weight) and ``/1`` (bias) of every learnt layer, strictly.

    Fixed bilinear deconvolution blobs, if the file has them, are checked and dropped; any other
    extra layer with blobs, a missing layer or a wrong shape raises ``CheckpointError``.
    """
    import h5py  # a base dependency, imported here: only the converter needs it

    source = str(h5_path)
    try:
        handle = h5py.File(h5_path, "r")
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read HDF5 ({exc}); not the Caffe file") from exc
    with handle:
        if "data" not in handle:
            raise CheckpointError(f"{source}: no /data group: not a Caffe HDF5 model")
        data = handle["data"]
        state: dict[str, torch.Tensor] = {}
        known = {name for name, *_ in LAYERS}
        for name, c_in, c_out, k, _ in LAYERS:
            if name not in data or "0" not in data[name] or "1" not in data[name]:
                raise CheckpointError(f"{source}: missing layer /data/{name} (weight and bias)")
            weight = torch.from_numpy(data[name]["0"][()]).float()
            bias = torch.from_numpy(data[name]["1"][()]).float()
            if tuple(weight.shape) != (c_out, c_in, k, k) or tuple(bias.shape) != (c_out,):
                raise CheckpointError(
                    f"{source}: /data/{name} has weight {tuple(weight.shape)}, bias "
                    f"{tuple(bias.shape)}; expected ({c_out}, {c_in}, {k}, {k}) and ({c_out},)"
                )
            state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
        for name in data:
            if name in known or len(data[name]) == 0:
                continue
            if name in FIXED_DECONVS:
                _check_bilinear(name, data[name]["0"], source)
                continue
            raise CheckpointError(f"{source}: unexpected layer with weights: /data/{name}")
    return state


def convert_caffe_hdf5(h5_path: Path | str, out_path: Path | str) -> str:
    """Convert the authors' Caffe HDF5 file to a strict PyTorch state dict; return its sha256."""
    state = caffe_hdf5_state_dict(h5_path)
    out = Path(out_path)
    write_atomic(out, lambda handle: torch.save(state, handle))
    digest = hashlib.sha256()
    with out.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_larsson_eccv16(
    path: Path | str,
    map_location: str | torch.device = "cpu",
    network_size: int = NETWORK_SIZE,
) -> LarssonECCV16:
    """The converted ``autocolorize.pth`` (or a file in its layout), strictly, in eval mode."""
    path = Path(path)
    state: Mapping[str, Any] = read_state_dict(path, map_location)
    network = LarssonECCV16(network_size)
    load_strict(network, state, str(path))
    return network.to(map_location).eval().requires_grad_(False)
