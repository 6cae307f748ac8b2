"""The torchvision Mask R-CNN detector: strict local weights, boxes only, whole batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from models.checkpoints import CheckpointError
from models.detector import (
    DETECTOR_WEIGHTS,
    BoxDetector,
    BucketedTransform,
    detector_canvas,
    detector_canvases,
)
from models.pipeline import ColorizeOptions, Colorizer
from models.preprocess import detector_lightness, lightness


@pytest.fixture(scope="module")
def detector(detector_weights: Path) -> BoxDetector:
    return BoxDetector.from_file(detector_weights, "v1", min_size=320, max_size=533)


def scene(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width), dtype=np.uint8)).convert(
        "RGB"
    )


def test_file_name_carries_the_sha256_prefix() -> None:
    assert DETECTOR_WEIGHTS["v1"].filename == "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert DETECTOR_WEIGHTS["v1"].sha256_prefix == "bf2d0c1e"
    assert DETECTOR_WEIGHTS["v2"].sha256_prefix == "73cbd019"


def test_mask_head_is_not_run(detector: BoxDetector) -> None:
    heads = detector.model.roi_heads
    assert heads.mask_head is None and heads.mask_predictor is None and not heads.has_mask()


def test_batch_of_different_sizes_in_one_call(detector: BoxDetector) -> None:
    images = []
    for width, height, seed in ((320, 240, 0), (200, 500, 1)):
        l_full = lightness(scene(width, height, seed))
        images.append(detector_lightness(l_full, detector.min_size, detector.max_size)[0])
    found = detector.detect(images, score_threshold=0.0)
    assert len(found) == 2
    for detections, image in zip(found, images, strict=True):
        assert detections.boxes, "a random-weight detector at threshold 0 still proposes boxes"
        assert list(detections.scores) == sorted(detections.scores, reverse=True)
        assert len(detections.labels) == len(detections.boxes)
        assert all(1 <= c <= 90 for c in detections.labels)  # COCO classes, 0 = background
        for x1, y1, x2, y2 in detections.boxes:
            assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
    assert detector.detect(images, score_threshold=1.0) == [type(found[0])((), ())] * 2


def test_pipeline_with_detector_caps_at_k_and_maps_boxes_to_the_input(
    tiny_checkpoints: Path, detector_weights: Path
) -> None:
    colorizer = Colorizer.load(tiny_checkpoints, detector_weights, detector_size=(320, 533))
    big = scene(2000, 1500, 3)  # shrunk for the detector, boxes mapped back to 2000x1500
    results = colorizer.colorize(
        [big, scene(300, 200, 4)],
        [
            ColorizeOptions(score_threshold=0.0, max_instances=8),
            ColorizeOptions(max_instances=3, score_threshold=0.0),
        ],
    )
    assert len(results[0].boxes) == 8 and len(results[1].boxes) == 3
    assert results[0].scores == sorted(results[0].scores)  # top-k comes out in ascending order
    assert max(b[2] for b in results[0].boxes) > 533 or max(b[3] for b in results[0].boxes) > 320
    assert results[0].image.size == (2000, 1500)


def test_wrong_version_says_so(detector_weights: Path) -> None:
    with pytest.raises(CheckpointError, match=r"Is this the v1 detector\?"):
        BoxDetector.from_file(detector_weights, "v2")


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        BoxDetector.from_file(tmp_path / "nope.pth")


SIZES = st.tuples(st.integers(1, 2500), st.integers(1, 2500))  # (height, width) of an input


@settings(max_examples=60, deadline=None)
@given(
    limits=st.sampled_from([(800, 1333), (320, 533), (64, 96), (100, 100)]),
    sizes=st.lists(SIZES, min_size=1, max_size=4),
)
def test_every_batch_fits_a_canvas(limits: tuple[int, int], sizes: list[tuple[int, int]]) -> None:
    """torchvision's own resize (the independent computation) of any input gives sizes that
    the chosen canvas holds; the canvas is one of the fixed buckets, landscape or portrait
    batches take their own, and only a mixed batch takes the square one."""
    min_size, max_size = limits
    stock = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
    resized = []
    for height, width in sizes:
        # torchvision itself refuses a side that its resize would shrink below one pixel
        assume(
            min(height, width) * min(min_size / min(height, width), max_size / max(height, width))
            >= 1
        )
        image, _ = stock.resize(torch.zeros(3, height, width), None)
        resized.append((int(image.shape[-2]), int(image.shape[-1])))
    canvas = detector_canvas(resized, min_size, max_size)
    canvases = detector_canvases(min_size, max_size)
    assert canvas in canvases and len(canvases) <= 3
    assert all(h <= canvas[0] and w <= canvas[1] for h, w in resized)
    assert all(side % 32 == 0 for side in canvas)
    # the canvas torchvision would pad to (its own batch_images) fits in the bucket
    padded = stock.batch_images([torch.zeros(3, h, w) for h, w in resized])
    assert padded.shape[-2] <= canvas[0] and padded.shape[-1] <= canvas[1]
    if all(h <= w for h, w in resized):
        assert canvas == canvases[0]
    elif all(h >= w for h, w in resized):
        assert canvas == canvases[min(1, len(canvases) - 1)]


def test_canvas_refuses_an_image_larger_than_every_bucket() -> None:
    with pytest.raises(ValueError, match="exceed the detector's canvases"):
        detector_canvas([(97, 200)], 64, 96)


@pytest.fixture(scope="module")
def small_detectors(detector_weights: Path) -> tuple[BoxDetector, BoxDetector]:
    """The same weights with and without shape buckets, at a CPU-friendly 64/96 size."""
    bucketed = BoxDetector.from_file(detector_weights, min_size=64, max_size=96, shape_buckets=True)
    stock = BoxDetector.from_file(detector_weights, min_size=64, max_size=96, shape_buckets=False)
    return bucketed, stock


def test_buckets_default_on_cuda_only(small_detectors: tuple[BoxDetector, BoxDetector]) -> None:
    bucketed, stock = small_detectors
    assert isinstance(bucketed.model.transform, BucketedTransform)
    assert not bucketed.model.transform.training  # else boxes stay in resized coordinates
    assert type(stock.model.transform) is GeneralizedRCNNTransform
    assert BoxDetector(stock.model, "v1", torch.device("cpu"), 64, 96).shape_buckets is False


def test_bucketed_batch_is_torchvisions_batch_padded_to_the_canvas(
    small_detectors: tuple[BoxDetector, BoxDetector],
) -> None:
    bucketed, stock = small_detectors
    images = [torch.rand(3, 50, 70), torch.rand(3, 40, 90)]  # landscape: canvas 64 x 96
    ours, _ = bucketed.model.transform(images)
    theirs, _ = stock.model.transform(images)
    assert ours.image_sizes == theirs.image_sizes
    assert tuple(ours.tensors.shape) == (2, 3, 64, 96)
    assert tuple(theirs.tensors.shape) == (2, 3, 64, 96 if theirs.image_sizes[1][1] > 64 else 64)
    height, width = theirs.tensors.shape[-2:]
    torch.testing.assert_close(ours.tensors[..., :height, :width], theirs.tensors, rtol=0, atol=0)
    assert not ours.tensors[..., height:, :].any() and not ours.tensors[..., width:].any()


def stock_run_padded_to(
    stock: BoxDetector, image: Image.Image, canvas: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The independent computation: torchvision's own transform output, zero-padded to
    ``canvas`` with ``F.pad``, through torchvision's own backbone, heads and postprocess."""
    model = stock.model
    plane = torch.from_numpy(np.array(image, dtype=np.uint8)).float().div(255).expand(3, -1, -1)
    with torch.inference_mode():
        images, _ = model.transform([plane])
        height, width = images.tensors.shape[-2:]
        images.tensors = torch.nn.functional.pad(
            images.tensors, (0, canvas[1] - width, 0, canvas[0] - height)
        )
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        detections, _ = model.roi_heads(features, proposals, images.image_sizes)
        output = model.transform.postprocess(
            detections, images.image_sizes, [(image.height, image.width)]
        )[0]
    return output["boxes"], output["scores"]


# (width, height) of a PIL image: landscape, portrait, square, and one whose resized size is
# the canvas already (there the stock detector's own run is the same computation)
@pytest.mark.parametrize("size", [(70, 50), (40, 90), (64, 64), (72, 48)])
def test_bucketed_boxes_equal_torchvisions_at_the_same_canvas(
    small_detectors: tuple[BoxDetector, BoxDetector], size: tuple[int, int]
) -> None:
    """Boxes stay in the image's own coordinates: the bucketed detector's boxes equal
    torchvision's model run on its own transform output padded to the same canvas."""
    bucketed, stock = small_detectors
    bucketed.model.roi_heads.score_thresh = stock.model.roi_heads.score_thresh = 0.0
    image = scene(*size, seed=size[0]).convert("L")
    found = bucketed.detect([image], score_threshold=0.0)[0]
    resized, _ = stock.model.transform.resize(torch.zeros(3, size[1], size[0]), None)
    canvas = detector_canvas([(int(resized.shape[-2]), int(resized.shape[-1]))], 64, 96)
    boxes, scores = stock_run_padded_to(stock, image, canvas)
    assert found.boxes, "a random-weight detector at threshold 0 still proposes boxes"
    torch.testing.assert_close(torch.tensor(found.boxes), boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(found.scores), scores, rtol=0, atol=1e-6)
    for x1, y1, x2, y2 in found.boxes:
        assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]
    if size == (72, 48):  # no padding beyond torchvision's: the unbucketed run is the same
        assert stock.detect([image], score_threshold=0.0)[0] == found


def test_warm_buckets_runs_every_canvas_and_image_count(
    small_detectors: tuple[BoxDetector, BoxDetector],
) -> None:
    bucketed, stock = small_detectors
    seen: set[tuple[int, ...]] = set()

    def record(module: object, args: tuple[torch.Tensor, ...]) -> None:
        seen.add(tuple(args[0].shape))

    handle = bucketed.model.backbone.register_forward_pre_hook(record)
    try:
        bucketed._warmed.clear()
        ran = bucketed.warm_buckets(3)
        expected = {(64, 96, n) for n in (1, 2, 3)} | {(96, 64, n) for n in (1, 2, 3)}
        expected |= {(96, 96, n) for n in (2, 3)}
        assert set(ran) == expected
        assert seen == {(n, 3, h, w) for h, w, n in expected}
        seen.clear()
        assert bucketed.warm_buckets(3) == [] and not seen  # already warm
    finally:
        handle.remove()
    assert stock.warm_buckets(3) == []  # no buckets, nothing to warm
