"""The torchvision Mask R-CNN detector: strict local weights, boxes only, whole batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.checkpoints import CheckpointError
from models.detector import DETECTOR_WEIGHTS, BoxDetector
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
