"""The evaluation metrics on pairs with known answers, and LPIPS against the lpips package itself."""

from __future__ import annotations

import math
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2gray

from evaluation.metrics import (
    LpipsError,
    LpipsMetric,
    colorfulness,
    paired_difference,
    psnr,
    score_pair,
    ssim,
    summarize,
)
from models.grey import training_grey, training_grey_array


def photo(seed: int = 0, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, size[1], dtype=np.float64)[None, :, None]
    noise = rng.integers(0, 50, (*size, 3))
    return (base + noise).astype(np.uint8)


def test_identical_images_give_infinite_psnr_and_unit_ssim() -> None:
    image = photo()
    assert psnr(image, image) == math.inf
    assert ssim(image, image) == pytest.approx(1.0)


def test_known_noise_gives_the_worked_psnr() -> None:
    target = np.clip(photo(), 5, 250)
    signs = np.where(np.indices(target.shape).sum(axis=0) % 2 == 0, 1, -1)
    pred = (target.astype(np.int16) + 5 * signs).astype(np.uint8)  # stays in 0..255
    # MSE = 25 exactly, so PSNR = 10 log10(255^2 / 25) = 20 log10(51)
    assert psnr(pred, target) == pytest.approx(20 * math.log10(51), abs=1e-9)
    assert 0.0 < ssim(pred, target) < 1.0


def test_grey_image_has_zero_colorfulness() -> None:
    grey = np.repeat(photo()[:, :, :1], 3, axis=2)
    assert colorfulness(grey) == 0.0


def test_colorfulness_worked_value() -> None:
    # Pixels pure red and pure blue. rg = R - G: (255, 0); yb = (R + G) / 2 - B: (127.5, -255).
    # mean rg 127.5, std rg 127.5; mean yb -63.75, std yb 191.25 (population std)
    # sigma = sqrt(127.5^2 + 191.25^2) = 127.5 sqrt(3.25); mu = sqrt(127.5^2 + 63.75^2) = 63.75 sqrt 5
    image = np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    expected = 127.5 * math.sqrt(3.25) + 0.3 * 63.75 * math.sqrt(5)
    assert colorfulness(image) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(272.62, abs=0.01)


def test_training_grey_is_rounded_skimage_luma_on_three_channels() -> None:
    rgb = photo(3)
    grey = training_grey_array(rgb)
    expected = np.round(rgb2gray(rgb) * 255).astype(np.uint8)
    assert grey.dtype == np.uint8
    assert grey.shape == rgb.shape
    for channel in range(3):
        np.testing.assert_array_equal(grey[:, :, channel], expected)
    assert training_grey_array(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))[
        0, :, 0
    ].tolist() == [54, 182, 18]  # 0.2125, 0.7154, 0.0721 of 255, rounded
    as_image = training_grey(Image.fromarray(rgb))
    assert as_image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(as_image), grey)


def test_summarize_leaves_infinities_out_and_counts_them() -> None:
    summary = summarize([30.0, 32.0, math.inf, 34.0, math.nan])
    assert summary["count"] == 3
    assert summary["infinite"] == 1
    assert summary["mean"] == pytest.approx(32.0)
    assert summary["median"] == pytest.approx(32.0)
    # t(0.975, 2) = 4.302653; sem = 2 / sqrt(3)
    half = 4.302652729749464 * 2.0 / math.sqrt(3)
    assert summary["ci95_low"] == pytest.approx(32.0 - half)
    assert summary["ci95_high"] == pytest.approx(32.0 + half)
    empty = summarize([math.nan])
    assert empty["count"] == 0
    assert math.isnan(empty["mean"])


def test_paired_difference_is_the_summary_of_the_differences() -> None:
    diff = paired_difference([1.0, 2.0, 3.0, math.inf], [1.5, 2.5, 4.0, 9.0])
    assert diff["count"] == 3
    assert diff["infinite"] == 1
    assert diff["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def backbone_like_lpips(library: lpips.LPIPS, weights: Path) -> None:
    """Copy torchvision VGG16 layers into the lpips backbone one module at a time."""
    state = torch.load(weights, weights_only=True)
    for name, module in library.net.named_modules():
        if name.count(".") == 1 and isinstance(module, torch.nn.Conv2d):
            index = name.split(".")[1]
            module.weight.data.copy_(state[f"features.{index}.weight"])
            module.bias.data.copy_(state[f"features.{index}.bias"])


@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_lpips_matches_the_library_on_the_same_weights(
    vgg16_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    metric = LpipsMetric.from_vgg16_file(vgg16_weights)
    library = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    backbone_like_lpips(library, vgg16_weights)
    a, b = photo(1), photo(2)
    expected = float(library(lpips.im2tensor(a), lpips.im2tensor(b)).item())
    assert metric(a, b) == pytest.approx(expected, rel=1e-5)
    assert metric(a, a) == pytest.approx(0.0, abs=1e-7)
    assert expected > 0.0
    scores = score_pair(a, b, metric)
    assert scores["lpips"] == pytest.approx(expected, rel=1e-5)
    assert math.isnan(score_pair(a, b, None)["lpips"])


def test_lpips_refuses_a_file_that_is_not_vgg16(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(LpipsError, match="features"):
        LpipsMetric.from_vgg16_file(wrong)
    with pytest.raises(LpipsError, match="not found"):
        LpipsMetric.from_vgg16_file(tmp_path / "missing.pth")


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)


@pytest.mark.usefixtures("no_downloads")
@pytest.mark.filterwarnings("ignore:.*disp.*:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_matches_pytorch_fid_on_the_same_weights(fid_inception_weights: Path) -> None:
    from pytorch_fid import inception
    from pytorch_fid.fid_score import calculate_frechet_distance

    from evaluation.fid import FidFeatures, frechet_distance

    # 192-d (second pooling) features: the library's cheap block, and a small sqrtm
    features = FidFeatures.from_inception_file(fid_inception_weights, dims=192)
    set_a = [photo(i, (40, 40)) for i in range(3)]
    set_b = [np.clip(photo(i + 10, (40, 40)).astype(int) + 30, 0, 255).astype(np.uint8)
             for i in range(3)]  # fmt: skip
    ours_a, ours_b = [features(x) for x in set_a], [features(x) for x in set_b]
    ours = frechet_distance(ours_a, ours_b)

    # the library's own network and distance, its weights handed over by hand
    state = torch.load(fid_inception_weights, weights_only=True)
    original = inception.load_state_dict_from_url
    inception.load_state_dict_from_url = lambda *a, **k: state
    try:
        library = inception.InceptionV3([1]).eval()
    finally:
        inception.load_state_dict_from_url = original

    def pool(images: list[np.ndarray]) -> np.ndarray:
        batch = torch.stack(
            [torch.from_numpy(x.copy()).permute(2, 0, 1).float() / 255 for x in images]
        )
        with torch.no_grad():
            pooled = torch.nn.functional.adaptive_avg_pool2d(library(batch)[0], (1, 1))
        return pooled.reshape(len(images), -1).double().numpy()

    a, b = pool(set_a), pool(set_b)
    np.testing.assert_allclose(np.stack(ours_a), a, rtol=1e-4, atol=1e-6)
    expected = calculate_frechet_distance(
        a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    )
    assert ours == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
    assert ours > 0
    assert frechet_distance(ours_a, ours_a) == pytest.approx(0.0, abs=1e-3)
    assert math.isnan(frechet_distance(ours_a[:1], ours_b[:1]))


def test_fid_refuses_a_file_that_is_not_the_fid_inception(tmp_path: Path) -> None:
    from evaluation.fid import FidError, FidFeatures

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(FidError, match="not pytorch-fid's FID Inception"):
        FidFeatures.from_inception_file(wrong)
    with pytest.raises(FidError, match="not found"):
        FidFeatures.from_inception_file(tmp_path / "missing.pth")
    with pytest.raises(FidError, match="must be one of"):
        FidFeatures.from_inception_file(wrong, dims=100)
