"""Larsson ECCV16: the Caffe HDF5 layout converted and loaded strictly, and numerical faithfulness.

Seeded random weights with the real channel counts are written with h5py in the layout of the
authors' ``autocolorize.caffemodel.h5`` (``/data/<layer>/0`` weight, ``/1`` bias, blob-less groups
for ReLU/pool layers, the fixed bilinear deconvolutions as the Caffe net stores them). The product
converts and loads the file; its ``predict_ab`` is compared with this file's own computation of the
prototxt (``autocolorize.prototxt.template``: convs from the HDF5 arrays, Caffe's bilinear filler,
the per-channel deconvolutions done as the prototxt's Reshape to one channel) and of
``calc_rgb_from_hue_chroma`` in NumPy (complex circular mean, scikit-image's ``hsv2rgb``), with a
NumPy RGB -> Lab of the product's constants. Nothing of ``models.larsson_eccv16`` is used for the
expected values. The network size is 64 (input 32 x 32, its S/2) so it runs on two cores; the
layers are the same for every multiple of 32.
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_impl import np_lab_norm2rgb, np_to_uint8
from skimage.color import hsv2rgb

from models.checkpoints import CheckpointError
from models.larsson_eccv16 import (
    LarssonECCV16,
    convert_caffe_hdf5,
    load_larsson_eccv16,
)
from models.registry import AutomaticColorizer, get_model

S = 64
BATCH = 2
# name, in, out, kernel: the prototxt's learnt layers
CONVS = [
    ("conv1_1", 1, 64, 3), ("conv1_2", 64, 64, 3),
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3),
    ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3", 512, 512, 3),
    ("fc6", 512, 4096, 7), ("fc7", 4096, 4096, 1),
    ("h_fc1", 12417, 1024, 1), ("prediction_h", 1024, 32, 1), ("prediction_c", 1024, 32, 1),
]  # fmt: skip


def caffe_bilinear(k: int) -> np.ndarray:
    """caffe::BilinearFiller, element by element."""
    f = math.ceil(k / 2.0)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    out = np.zeros((1, 1, k, k), np.float32)
    for i in range(k * k):
        x, y = i % k, (i // k) % k
        out[0, 0, y, x] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    return out


def write_caffe_h5(path: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as h5:
        data = h5.create_group("data")
        data.create_group("data")  # layers without blobs are empty groups
        for name, c_in, c_out, k in CONVS:
            std = math.sqrt(2.0 / (c_in * k * k))
            if name.startswith("prediction"):
                std *= 6.0  # peaked histograms, so hue, chroma and fading are all exercised
            group = data.create_group(name)
            group["0"] = rng.standard_normal((c_out, c_in, k, k), dtype=np.float32) * np.float32(
                std
            )
            group["1"] = rng.standard_normal(c_out, dtype=np.float32) * np.float32(0.05)
            data.create_group("relu_" + name)
        for name, k in (("conv4_1_full_reshaped", 4), ("fc6_full_reshaped", 16)):
            data.create_group(name)["0"] = caffe_bilinear(k)


@pytest.fixture(scope="module")
def caffe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("larsson") / "autocolorize.caffemodel.h5"
    write_caffe_h5(path)
    return path


@pytest.fixture(scope="module")
def converted(caffe_file: Path) -> tuple[Path, str]:
    out = caffe_file.parent / "larsson-eccv16" / "autocolorize.pth"
    return out, convert_caffe_hdf5(caffe_file, out)


# -- the independent computation -------------------------------------------------------------------


def reference_histograms(h5_path: Path, grey: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(h5_path, "r") as h5:
        w = {n: (torch.from_numpy(h5["data"][n]["0"][()]), torch.from_numpy(h5["data"][n]["1"][()]))
             for n, *_ in CONVS}  # fmt: skip

    def conv(name: str, x: torch.Tensor, pad: int) -> torch.Tensor:
        return torch.relu(F.conv2d(x, w[name][0], w[name][1], padding=pad))

    def deconv(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
        n, c, h, wd = x.shape  # Reshape to one channel, Deconvolution num_output 1, Reshape back
        y = F.conv_transpose2d(x.reshape(n * c, 1, h, wd), torch.from_numpy(caffe_bilinear(k)),
                               stride=stride, padding=pad)  # fmt: skip
        return y.reshape(n, c, y.shape[-2], y.shape[-1])

    top: dict[str, torch.Tensor] = {"data": grey}
    x = grey
    for names in (
        (["conv1_1", "conv1_2"], ["conv2_1", "conv2_2"], ["conv3_1", "conv3_2", "conv3_3"],
         ["conv4_1", "conv4_2", "conv4_3"], ["conv5_1", "conv5_2", "conv5_3"])
    ):  # fmt: skip
        for name in names:
            x = top[name] = conv(name, x, 1)
        x = F.max_pool2d(x, 2, 2)
    top["fc6"] = conv("fc6", x, 3)
    top["fc7"] = conv("fc7", top["fc6"], 0)
    full = [F.avg_pool2d(top["data"], 4, 4)]
    full += [F.avg_pool2d(top[n], 4, 4) for n in ("conv1_1", "conv1_2")]
    full += [F.avg_pool2d(top[n], 2, 2) for n in ("conv2_1", "conv2_2")]
    full += [top[n] for n in ("conv3_1", "conv3_2", "conv3_3")]
    full += [deconv(top[n], 4, 2, 1) for n in ("conv4_1", "conv4_2", "conv4_3")]
    full += [deconv(top[n], 8, 4, 2) for n in ("conv5_1", "conv5_2", "conv5_3")]
    full += [deconv(top[n], 16, 8, 4) for n in ("fc6", "fc7")]
    hyper = torch.cat(full, 1)
    assert hyper.shape[1] == 12417
    h = conv("h_fc1", hyper, 0)
    out = []
    for name in ("prediction_h", "prediction_c"):
        logits = F.conv2d(h, w[name][0], w[name][1])
        out.append(deconv(torch.softmax(logits, 1), 8, 4, 2).numpy())
    return out[0], out[1]


def reference_rgb(hist_h: np.ndarray, hist_c: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """calc_rgb_from_hue_chroma (median chroma, expectation hue, fading), bins last."""
    hist_h, hist_c = np.moveaxis(hist_h, 0, -1), np.moveaxis(hist_c, 0, -1)
    centres = (np.arange(32) + 0.5) / 32
    chroma = ((np.cumsum(hist_c, axis=-1) < 0.5).sum(-1) + 0.5) / 32
    a = hist_h * np.exp(2j * np.pi * centres)
    hue = (np.angle(a.sum(-1)) / (2 * np.pi)) % 1
    chroma = chroma * np.clip(np.abs(a.mean(-1)), 0, 0.03) / 0.03
    val = grey + chroma / 2
    sat = 2 * chroma / (2 * grey + chroma)
    hsv = np.clip(np.stack([hue, sat, val], -1), 0, 1)
    rgb = np.clip(hsv2rgb(hsv), 0, 1)
    return np.clip(rgb - rgb.mean(-1, keepdims=True) + grey[..., None], 0, 1)


def np_rgb2ab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (2, H, W) Lab ab, the product's documented constants, float64."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])  # fmt: skip
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])])


# -- tests -------------------------------------------------------------------------------------------


def test_conversion_and_faithfulness(caffe_file: Path, converted: tuple[Path, str]) -> None:
    path, digest = converted
    assert len(digest) == 64 and int(digest, 16) >= 0
    state = torch.load(path, weights_only=True)
    assert len(state) == 36 and sum(v.numel() for v in state.values()) == 147_041_024
    model = load_larsson_eccv16(path, network_size=S)
    assert isinstance(model, AutomaticColorizer) and model.input_size == S // 2

    gen = torch.Generator().manual_seed(3)
    lightness = torch.rand(BATCH, 1, S // 2, S // 2, generator=gen) * 100
    with torch.no_grad():
        ab = model.predict_ab(lightness).numpy()
    assert ab.shape == (BATCH, 2, S // 2, S // 2)

    pad = S // 4  # the release's rule for an S/2 square: scale 1, centre-padded into S x S
    padded = F.pad(lightness / 100, (pad, pad, pad, pad))
    hist_h, hist_c = reference_histograms(caffe_file, padded)
    saturated = 0
    for i in range(BATCH):
        grey = lightness[i, 0].double().numpy() / 100
        inner = (slice(None), slice(pad, pad + S // 2), slice(pad, pad + S // 2))
        rgb = reference_rgb(hist_h[i][inner].astype(np.float64), hist_c[i][inner], grey)
        saturated += int((rgb.max(-1) - rgb.min(-1) > 0.05).sum())
        ab_ref = np_rgb2ab(rgb)
        assert np.abs(ab[i] - ab_ref).max() < 2e-3  # Lab units; 1 LSB is about 0.4
        l_norm = (lightness[i].numpy() - 50) / 100
        ours = np_to_uint8(np_lab_norm2rgb(l_norm, ab[i] / 110))
        theirs = np_to_uint8(np_lab_norm2rgb(l_norm, ab_ref.astype(np.float32) / 110))
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert saturated > 0.2 * BATCH * (S // 2) ** 2  # colour, not a grey that matches trivially


def test_registry_loads_the_converted_file(converted: tuple[Path, str]) -> None:
    path, _ = converted
    spec = get_model("larsson-eccv16")
    assert spec.weight_paths(path.parent.parent) == (path,)
    assert spec.weights[0].converted_from is not None
    assert spec.weights[0].converted_from.filename == "autocolorize.caffemodel.h5"
    assert spec.weights[0].converted_from.size == 588_203_256
    model = spec.load(path.parent.parent)
    assert isinstance(model, LarssonECCV16) and model.input_size == 256


def test_loader_refuses_missing_unexpected_and_misshaped(
    tmp_path: Path, converted: tuple[Path, str]
) -> None:
    state = torch.load(converted[0], weights_only=True)
    partial = {k: v for k, v in state.items() if not k.startswith("fc7")}
    torch.save(partial, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: fc7\.weight"):
        load_larsson_eccv16(tmp_path / "missing.pth")
    torch.save({**state, "fc8.bias": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: fc8\.bias"):
        load_larsson_eccv16(tmp_path / "extra.pth")
    torch.save({**state, "prediction_c.bias": torch.zeros(31)}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"prediction_c\.bias \(31,\)"):
        load_larsson_eccv16(tmp_path / "shape.pth")


def test_converter_refuses_a_file_not_in_the_layout(tmp_path: Path, caffe_file: Path) -> None:
    out = tmp_path / "out.pth"
    with h5py.File(tmp_path / "shape.h5", "w") as h5:
        h5["data/conv1_1/0"] = np.zeros((64, 3, 3, 3), np.float32)  # an RGB VGG, not the grey one
        h5["data/conv1_1/1"] = np.zeros(64, np.float32)
    with pytest.raises(CheckpointError, match=r"conv1_1 has weight \(64, 3, 3, 3\)"):
        convert_caffe_hdf5(tmp_path / "shape.h5", out)
    with h5py.File(tmp_path / "missing.h5", "w") as h5:
        h5.create_group("data")
    with pytest.raises(CheckpointError, match="missing layer /data/conv1_1"):
        convert_caffe_hdf5(tmp_path / "missing.h5", out)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="cannot read HDF5"):
        convert_caffe_hdf5(tmp_path / "text.h5", out)
    # Extra blobs in the full file: a non-bilinear fixed deconvolution, then an unknown layer.
    with h5py.File(caffe_file, "r+") as h5:
        h5["data/conv5_1_full_reshaped/0"] = np.ones((1, 1, 8, 8), np.float32)
    try:
        with pytest.raises(CheckpointError, match="conv5_1_full_reshaped is not the bilinear"):
            convert_caffe_hdf5(caffe_file, out)
        with h5py.File(caffe_file, "r+") as h5:
            del h5["data/conv5_1_full_reshaped"]
            h5["data/fc8/0"] = np.zeros((10, 4096, 1, 1), np.float32)
        with pytest.raises(CheckpointError, match="unexpected layer with weights: /data/fc8"):
            convert_caffe_hdf5(caffe_file, out)
    finally:
        with h5py.File(caffe_file, "r+") as h5:
            for name in ("conv5_1_full_reshaped", "fc8"):
                if name in h5["data"]:
                    del h5["data"][name]
    assert not out.exists()
