"""The annealed mean's ``temperature`` as a per-image option (zhang-eccv16, li-dcnn).

Faithfulness: with seeded weights in the official layout and the real loaders, the pipeline's
output at a non-default T equals the annealed mean computed here independently in NumPy (the
release's probabilities p = softmax(z), then p^(1/T) renormalised, the expectation of the bin
centres read from the weight file, a bilinear x4 written out, the reference Lab -> RGB) within
1 LSB in fp32; images with different temperatures share one batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_impl import np_lab_norm2rgb, np_to_uint8
from weight_files import write_eccv16_release, write_li_dcnn, write_zoo_model

from models.automatic import AutomaticPipeline
from models.constants import ANNEALED_MEAN_MODELS, TEMPERATURE_RANGE
from models.li_dcnn import LiDCNN
from models.pipeline import ColorizeOptions, OptionsError
from models.registry import MODELS, get_model
from models.zhang_eccv16 import ZhangECCV16
from models.zoo import load_colorizer


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("temperature-weights")
    (eccv16,) = get_model("zhang-eccv16").weight_paths(root)
    write_eccv16_release(eccv16, seed=5, logit_scale=4.0)  # peaked bin distributions
    write_zoo_model(root, "zhang-siggraph17", seed=6)
    write_li_dcnn(root, seed=7)
    return root


def photos(n: int) -> list[Image.Image]:
    """Seeded grey photos with texture (a gradient plus noise), 96 x 80."""
    rng = np.random.default_rng(19)
    ramp = np.linspace(20, 235, 96)[None, :].repeat(80, 0)
    return [
        Image.fromarray(
            np.clip(ramp + rng.normal(0, 25, ramp.shape), 0, 255).astype(np.uint8)
        ).convert("RGB")
        for _ in range(n)
    ]


def np_bilinear_x4(x: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C, 4h, 4w): half-pixel centres, edges clamped (align_corners=False)."""

    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(4 * n) + 0.5) / 4.0 - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(x.shape[1])
    x0, x1, wx = axis(x.shape[2])
    rows = x[:, y0, :] * (1 - wy)[None, :, None] + x[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


def np_annealed_ab(logits: np.ndarray, centres: np.ndarray, t: float) -> np.ndarray:
    """(313, h, w) logits, (2, 313) centres / 110 -> (2, 4h, 4w) ab in Lab units."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=0, keepdims=True))
    p /= p.sum(axis=0, keepdims=True)  # the release's probabilities (T = 1)
    log_q = np.log(p) / t
    q = np.exp(log_q - log_q.max(axis=0, keepdims=True))
    q /= q.sum(axis=0, keepdims=True)  # softmax(log p / T), renormalised
    ab = np.einsum("cq,qhw->chw", centres.astype(np.float64), q)
    return np_bilinear_x4(ab) * 110.0


def bin_centres_from_file(path: Path) -> np.ndarray:
    """``model_out``'s weight as the file holds it: (2, 313), the bin centres / 110."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model_out.weight"][:, :, 0, 0].double().numpy()


@pytest.mark.parametrize(
    ("name", "temperatures"),
    [("zhang-eccv16", (None, 0.38, 0.7)), ("li-dcnn", (None, 1.0, 0.1))],
)
@torch.inference_mode()
def test_the_output_at_a_temperature_is_the_annealed_mean(
    weights: Path, name: str, temperatures: tuple[float | None, ...]
) -> None:
    pipeline = load_colorizer(name, weights, precision="fp32", channels_last=False)
    assert isinstance(pipeline, AutomaticPipeline)
    (path,) = get_model(name).weight_paths(weights)
    centres = bin_centres_from_file(path)
    options = [ColorizeOptions(resolution="network", temperature=t) for t in temperatures]
    prepared = [pipeline.prepare(p, o) for p, o in zip(photos(3), options, strict=True)]
    predictions = pipeline.predict(prepared)  # one batch, three temperatures
    network = pipeline.model
    chroma = []
    for p, prediction, t in zip(prepared, predictions, temperatures, strict=True):
        assert p.network_l is not None
        bins = network.logits(p.network_l[None].sub(50.0).div(100.0))  # type: ignore[operator]
        bins = bins[0] if isinstance(bins, tuple) else bins  # li-dcnn: (bins, classes)
        default_t = ANNEALED_MEAN_MODELS[name]
        want = np_annealed_ab(bins[0].numpy(), centres, default_t if t is None else t)
        got = prediction.ab.double().numpy() * 110.0
        assert np.abs(got - want).max() < 1e-2
        rgb_got = np.array(pipeline.merge(p, prediction).image).astype(int)
        l_norm = p.l_norm.numpy().astype(np.float32)
        rgb_want = np_to_uint8(np_lab_norm2rgb(l_norm, (want / 110.0).astype(np.float32)))
        assert np.abs(rgb_got - np.transpose(rgb_want, (1, 2, 0)).astype(int)).max() <= 1
        chroma.append(np.abs(want).max())
        if t is not None:  # the option matters: a visibly different ab from the default's
            assert np.abs(got - np_annealed_ab(bins[0].numpy(), centres, default_t)).max() > 1.0
    assert max(chroma) > 10.0  # not vacuous: the 1 LSB comparison is on colours far from grey


@torch.inference_mode()
def test_the_default_is_the_model_s_own_path_bit_for_bit(weights: Path) -> None:
    """Without ``temperature`` the batch runs ``predict_ab`` exactly as before the option."""
    pipeline = load_colorizer("zhang-eccv16", weights, precision="fp32", channels_last=False)
    assert isinstance(pipeline, AutomaticPipeline)
    prepared = [pipeline.prepare(p, ColorizeOptions()) for p in photos(2)]
    got = torch.stack([p.ab for p in pipeline.predict(prepared)])
    x = torch.stack([p.network_l for p in prepared])  # type: ignore[misc]
    want = pipeline.model.predict_ab(x).float() / 110.0  # type: ignore[operator]
    assert torch.equal(got, want)
    # and T = 1 given explicitly is the release's softmax(z) too (z / 1.0 is exact)
    explicit = [pipeline.prepare(p, ColorizeOptions(temperature=1.0)) for p in photos(2)]
    assert torch.equal(torch.stack([p.ab for p in pipeline.predict(explicit)]), got)


@pytest.mark.parametrize("value", [0.0, 0.005, 1.5, float("nan"), -0.38])
def test_a_temperature_out_of_range_says_what_to_fix(weights: Path, value: float) -> None:
    pipeline = load_colorizer("zhang-eccv16", weights, precision="fp32")
    low, high = TEMPERATURE_RANGE
    with pytest.raises(OptionsError, match=f"temperature must be between {low:g} and {high:g}"):
        pipeline.prepare(photos(1)[0], ColorizeOptions(temperature=value))


def test_models_without_the_annealed_mean_refuse_a_temperature(
    weights: Path, tiny_colorizer: object
) -> None:
    siggraph = load_colorizer("zhang-siggraph17", weights, precision="fp32")
    with pytest.raises(OptionsError, match="'zhang-siggraph17' does not decode by the annealed"):
        siggraph.prepare(photos(1)[0], ColorizeOptions(temperature=0.38))
    with pytest.raises(OptionsError, match="'instcolor' does not decode by the annealed mean"):
        tiny_colorizer.check_options(ColorizeOptions(temperature=0.38))  # type: ignore[attr-defined]


def test_the_annealed_mean_models_and_their_defaults_are_the_networks() -> None:
    """``ANNEALED_MEAN_MODELS`` (read without torch by the API) is what the networks say."""
    assert ZhangECCV16().temperature == ANNEALED_MEAN_MODELS["zhang-eccv16"] == 1.0
    assert LiDCNN().temperature == ANNEALED_MEAN_MODELS["li-dcnn"] == 0.38
    assert set(ANNEALED_MEAN_MODELS) <= set(MODELS)
    assert ZhangECCV16.decodes_by_annealed_mean and LiDCNN.decodes_by_annealed_mean
