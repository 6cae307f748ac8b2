"""Larsson ECCV16 through the product's paths: ``POST /colorize?model=larsson-eccv16``,
``GET /models``, the page's model list, and ``evaluate --model larsson-eccv16``.

The weights are seeded, with the real channel counts (147 M parameters), in the Caffe HDF5 layout,
converted by the product (the ``larsson_weights`` fixture). To keep the tests fast the network
runs at the processing size 64 (``COLORIZE_LARSSON_SIZE``, the release's ``--size``; input 32),
the same weights and code as at the default 512, which tests/test_fetch_models.py runs once
through ``colorize``. Faithfulness to the release is tests/test_larsson_eccv16.py's subject;
here each answer must equal the library pipeline's own output for the same image and size.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import image_corpus as corpus
import numpy as np
import pytest
from PIL import Image
from service_helpers import running_app, service_settings
from skimage.color import rgb2gray

from models.checkpoints import sha256_file
from models.registry import get_model
from models.zoo import ModelColorizer, load_colorizer
from service.cli import main

SIZE = 64  # the network's processing size in these tests; the input is half of it


def library(weights: Path) -> ModelColorizer:
    return load_colorizer("larsson-eccv16", weights, precision="fp32", network_size=SIZE)


def test_the_network_size_is_the_release_rule_at_any_size(larsson_weights: Path) -> None:
    """A sized load is the same weights at another size: input half the size; the registry
    refuses a size for a model that has none, and the settings a size that is no multiple of 32."""
    from pydantic import ValidationError

    from service.settings import ModelSettings

    pipeline = library(larsson_weights)
    assert pipeline.describe()["input_size"] == SIZE // 2
    default = get_model("larsson-eccv16").load(larsson_weights)
    assert default.input_size == 256
    with pytest.raises(ValueError, match="runs at one size only"):
        get_model("zhang-eccv16").load(larsson_weights, network_size=64)
    with pytest.raises(ValidationError, match="multiple of 32"):
        ModelSettings(larsson_size=100)


async def test_colorize_with_model_larsson_through_the_api(larsson_weights: Path) -> None:
    settings = service_settings(
        larsson_weights / "checkpoints",
        weights_dir=larsson_weights,
        models="instcolor,larsson-eccv16",
        larsson_size=SIZE,
    )
    async with running_app(settings) as (_, client):
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert list(listed) == ["instcolor", "larsson-eccv16"]
        larsson = listed["larsson-eccv16"]
        (path,) = get_model("larsson-eccv16").weight_paths(larsson_weights)
        assert larsson["files"] == [{"name": "autocolorize.pth", "sha256": sha256_file(path)}]
        assert larsson["loaded"] is True and larsson["uses_boxes"] is False
        assert larsson["input_size"] == SIZE // 2

        image = corpus.png(70, 50)
        headers = {"content-type": "image/png"}
        answer = await client.post("/colorize?model=larsson-eccv16", content=image, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model"] == "larsson-eccv16"
        assert answer.headers["x-model-version"] == larsson["model_version"]
        assert 'desc="larsson-eccv16"' in answer.headers["server-timing"]
        got = np.array(Image.open(io.BytesIO(answer.content)).convert("RGB"))
        photo = Image.open(io.BytesIO(image)).convert("RGB")
        (want,) = library(larsson_weights).colorize([photo])
        assert got.shape == (50, 70, 3)
        assert np.array_equal(got, np.array(want.image))
        spread = got.astype(int).max(axis=2) - got.astype(int).min(axis=2)
        assert spread.max() > 0  # colour, not grey: the decoding ran

        boxed = await client.post(
            "/colorize?model=larsson-eccv16&boxes=[[1,1,20,20]]", content=image, headers=headers
        )
        assert boxed.status_code == 422 and "does not use boxes" in boxed.json()["detail"]
        other = await client.post("/colorize?model=zhang-eccv16", content=image, headers=headers)
        assert other.status_code == 422
        assert "instcolor, larsson-eccv16" in other.json()["detail"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_evaluate_model_larsson(
    larsson_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``evaluate --model larsson-eccv16``: the report names the model and its version, and each
    photo's PSNR is that of the library's output against the photo, computed here in NumPy."""
    monkeypatch.chdir(tmp_path)  # no weights/vgg16 file here: no LPIPS unless asked
    monkeypatch.setenv("COLORIZE_LARSSON_SIZE", str(SIZE))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    originals = {}
    for i, (w, h) in enumerate([(72, 48), (40, 56)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
        originals[f"p{i}.png"] = pixels
    report = tmp_path / "report"
    common = ["--model", "larsson-eccv16", "--no-progress", "--no-detector", "--precision",
              "fp32", "--weights-dir", str(larsson_weights)]  # fmt: skip
    # the paper's 256 px protocol needs the model at its default size (input 256): refused here
    assert main(["evaluate", str(photos), "-o", str(report), *common]) == 2
    assert "--resolution network scores at 256 px" in capsys.readouterr().err
    code = main(["evaluate", str(photos), "-o", str(report), "--resolution", "original", *common])
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    pipeline = library(larsson_weights)
    assert summary["config"]["model"] == "larsson-eccv16"
    assert summary["model_version"] == pipeline.version
    with (report / "metrics.csv").open(newline="") as handle:
        rows = {r["path"]: float(r["psnr"]) for r in csv.DictReader(handle)}
    assert set(rows) == set(originals)
    for name, pixels in originals.items():
        grey_channel = np.round(rgb2gray(pixels) * 255.0).astype(np.uint8)  # the spec's grey
        grey = Image.fromarray(np.repeat(grey_channel[:, :, None], 3, axis=2))
        (out,) = pipeline.colorize([grey])  # at the original resolution
        assert rows[name] == pytest.approx(psnr(np.array(out.image), pixels), abs=1e-3), name


@pytest.mark.slow  # bf16 is emulated on an AVX2 CPU: minutes on 2 shared cores
@pytest.mark.parametrize("name", ["zhang-eccv16", "zhang-siggraph17", "larsson-eccv16"])
def test_precision_channels_last_and_saturation_work_for_every_automatic_model(
    name: str, zoo_weights: Path, larsson_weights: Path
) -> None:
    """Issue 19: precision modes, channels_last and the saturation control for each model
    without the detector. NHWC equals NCHW within 1 LSB; bf16 stays close to fp32; saturation s
    equals the model's own ab times s, upsampled and joined to the original L, computed here."""
    import torch

    from models.lab import lab_to_rgb, rgb_to_lab, to_uint8
    from models.pipeline import ColorizeOptions
    from models.preprocess import to_tensor

    weights = larsson_weights if name == "larsson-eccv16" else zoo_weights
    size = SIZE if name == "larsson-eccv16" else None

    def load(**kwargs: object) -> ModelColorizer:
        return load_colorizer(name, weights, network_size=size, **kwargs)  # type: ignore[arg-type]

    photo = Image.linear_gradient("L").resize((60, 44)).convert("RGB")
    nhwc = np.array(load(precision="fp32", channels_last=True).colorize([photo])[0].image)
    nchw_pipeline = load(precision="fp32", channels_last=False)
    nchw = np.array(nchw_pipeline.colorize([photo])[0].image)
    assert np.abs(nhwc.astype(int) - nchw.astype(int)).max() <= 1
    bf16_pipeline = load(precision="bf16")
    assert bf16_pipeline.precision == "bf16"
    bf16 = np.array(bf16_pipeline.colorize([photo])[0].image)
    assert np.abs(bf16.astype(int) - nchw.astype(int)).mean() <= 3.0

    strength = 1.5
    (result,) = nchw_pipeline.colorize([photo], ColorizeOptions(saturation=strength))
    model = get_model(name).load(weights, network_size=size)
    side = model.input_size
    small = photo.resize((side, side), Image.Resampling.BILINEAR)
    with torch.inference_mode():
        ab = model.predict_ab(rgb_to_lab(to_tensor(small))[0:1][None])[0] * strength
    full = rgb_to_lab(to_tensor(photo))
    ab_up = torch.nn.functional.interpolate(
        ab[None], size=(44, 60), mode="bilinear", align_corners=False, antialias=True
    )[0]
    want = to_uint8(lab_to_rgb(torch.cat((full[0:1], ab_up))).clamp(0, 1)).permute(1, 2, 0)
    got = torch.from_numpy(np.array(result.image))
    assert (got.int() - want.int()).abs().max() <= 1
