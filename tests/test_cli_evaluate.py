"""``python -m service evaluate``: the report folder, metrics recomputed from the saved images,
LPIPS, --compare, instance crops from a COCO file, bad inputs. Tiny checkpoints, in-process."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from weight_files import write_official

from evaluation.dataset import GroundTruth
from evaluation.metrics import LpipsMetric, colorfulness
from evaluation.report import build_summary, write_report_html
from evaluation.run import EvaluationRun, ImageScore
from models.grey import training_grey
from models.pipeline import ColorizeOptions, Colorizer
from models.preprocess import resize_to_network
from service.cli import main
from service.commands.evaluate import parse_compare


def colour_photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.concatenate([200 * x + 0 * y, 180 * y + 0 * x, 120 * (1 - x) + 0 * y], axis=2)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise + 20, 0, 255).astype(np.uint8))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "val").mkdir(parents=True)
    colour_photo(96, 64, 1).save(root / "a.png")
    colour_photo(80, 80, 2).save(root / "val" / "b.jpg", quality=95)
    colour_photo(64, 48, 3).save(root / "val" / "c.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def evaluate(*args: str | Path, checkpoints: Path) -> int:
    return main(["evaluate", *map(str, args), "--no-progress", "--no-detector",
                 "--checkpoints", str(checkpoints)])  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.links.append(value)


def assert_self_contained(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text
    assert "https://" not in text
    assert "//" not in text.replace("<!DOCTYPE", "")  # no protocol-relative URL either
    parser = Links()
    parser.feed(text)
    assert parser.links
    root = page.parent.resolve()
    for link in parser.links:
        target = (page.parent / link).resolve()
        assert target.is_relative_to(root), link
        assert target.is_file(), link


@pytest.fixture(autouse=True)
def no_default_lpips_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run where weights/vgg16-397923af.pth does not exist, so LPIPS is only what a test asks."""
    monkeypatch.chdir(tmp_path)


def test_folder_gives_the_report_and_its_scores_recompute_from_the_saved_images(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    # fp32 pinned: the saved images are compared with an fp32 library call below (the default
    # `auto` is bf16 on a CPU with AMX or AVX512-BF16)
    code = evaluate(photos, "-o", report, "--precision", "fp32", checkpoints=tiny_checkpoints)
    assert code == 1  # broken.jpg
    err = capsys.readouterr().err
    assert "broken.jpg" in err
    assert "no LPIPS" in err
    rows = read_csv(report / "metrics.csv")
    assert list(rows[0]) == ["path", "psnr", "ssim", "lpips", "colorfulness", "instances"]
    assert [r["path"] for r in rows] == ["a.png", "val/b.jpg", "val/c.png"]
    colorizer = Colorizer.load(tiny_checkpoints, precision="fp32")
    for row in rows:
        saved = np.asarray(Image.open(report / "images" / Path(row["path"]).with_suffix(".png")))
        assert saved.shape == (256, 256, 3)  # network resolution by default
        with Image.open(photos / row["path"]) as photo:
            target = np.asarray(resize_to_network(photo.convert("RGB")))
            # the same batched engine, fed the training grey of the full-resolution photo
            direct = colorizer.colorize(
                [training_grey(photo)], ColorizeOptions(resolution="network")
            )[0]
        np.testing.assert_array_equal(saved, np.asarray(direct.image))
        assert float(row["psnr"]) == pytest.approx(
            peak_signal_noise_ratio(target, saved, data_range=255), rel=1e-12
        )
        assert float(row["ssim"]) == pytest.approx(
            structural_similarity(target, saved, channel_axis=2, data_range=255), rel=1e-12
        )
        assert float(row["colorfulness"]) == pytest.approx(colorfulness(saved), rel=1e-12)
        assert row["lpips"] == ""
        assert row["instances"] == ""
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == 3
    assert summary["failed"] == 1
    assert summary["failures"][0]["path"].endswith("broken.jpg")
    psnr = summary["metrics"]["psnr"]
    assert psnr["count"] == 3
    assert psnr["infinite"] == 0
    assert psnr["mean"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]))
    assert psnr["ci95_low"] < psnr["mean"] < psnr["ci95_high"]
    assert summary["metrics"]["lpips"]["count"] == 0
    assert summary["model_version"] == colorizer.version
    assert summary["config"]["resolution"] == "network"
    assert summary["machine"]["device"] == "cpu"
    assert summary["instances"] is None
    assert_self_contained(report / "report.html")
    html = (report / "report.html").read_text()
    assert "sheet_psnr_best.png" in html
    assert "histogram_ssim.png" in html


def test_lpips_column_equals_the_metric_on_the_saved_images(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path, vgg16_weights: Path
) -> None:
    report = tmp_path / "report"
    code = evaluate(photos / "val", "-o", report, "--resolution", "original",
                    "--lpips-weights", vgg16_weights, checkpoints=tiny_checkpoints)  # fmt: skip
    assert code == 0
    metric = LpipsMetric.from_vgg16_file(vgg16_weights)
    rows = read_csv(report / "metrics.csv")
    assert len(rows) == 2
    for row in rows:
        saved = np.asarray(Image.open(report / "images" / Path(row["path"]).with_suffix(".png")))
        target = np.asarray(Image.open(photos / "val" / row["path"]).convert("RGB"))
        assert saved.shape == target.shape  # original resolution
        assert float(row["lpips"]) == pytest.approx(metric(saved, target), rel=1e-5)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["metrics"]["lpips"]["count"] == 2
    assert_self_contained(report / "report.html")
    assert "sheet_lpips_worst.png" in (report / "report.html").read_text()


def test_compare_two_configurations_side_by_side(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = write_official(tmp_path / "other", width=8, seed=5)
    report = tmp_path / "report"
    code = evaluate(photos / "val", "-o", report, "--compare", "base=",
                    f"retrained=--checkpoints {other}", checkpoints=tiny_checkpoints)  # fmt: skip
    assert code == 0
    base = read_csv(report / "base" / "metrics.csv")
    retrained = read_csv(report / "retrained" / "metrics.csv")
    assert [r["path"] for r in base] == [r["path"] for r in retrained] == ["b.jpg", "c.png"]
    assert base[0]["psnr"] != retrained[0]["psnr"]  # different weights, different results
    for name in ("base", "retrained"):
        assert_self_contained(report / name / "report.html")
    comparison = json.loads((report / "comparison.json").read_text())
    assert comparison["baseline"] == "base"
    assert comparison["paired_images"] == 2
    rows = {r["name"]: r for r in comparison["metrics"]["psnr"]["rows"]}
    assert rows["base"]["difference"] is None
    difference = rows["retrained"]["difference"]
    expected = np.mean(
        [float(r["psnr"]) - float(b["psnr"]) for r, b in zip(retrained, base, strict=True)]
    )
    assert difference["mean"] == pytest.approx(expected)
    assert difference["count"] == 2
    assert difference["ci95_low"] <= difference["mean"] <= difference["ci95_high"]
    summaries = [
        json.loads((report / n / "summary.json").read_text()) for n in ("base", "retrained")
    ]
    assert summaries[0]["model_version"] != summaries[1]["model_version"]
    assert summaries[1]["config"]["compare_flags"] == f"--checkpoints {other}"
    assert_self_contained(report / "comparison.html")
    assert "comparison" in capsys.readouterr().out


def test_instance_crops_from_coco_annotations(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path
) -> None:
    from evaluation.metrics import psnr

    annotations = {
        "images": [{"id": 1, "file_name": "a.png", "width": 96, "height": 64},
                   {"id": 2, "file_name": "c.png", "width": 64, "height": 48}],
        "categories": [{"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 8, 50, 40], "category_id": 18, "iscrowd": 0},
            {"id": 11, "image_id": 1, "bbox": [0, 0, 96, 64], "category_id": 18, "iscrowd": 1},
            {"id": 12, "image_id": 1, "bbox": [90, 60, 3, 2], "category_id": 18, "iscrowd": 0},
            {"id": 13, "image_id": 2, "bbox": [4.5, 6.2, 30, 20], "category_id": 18},
        ],
    }  # fmt: skip
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps(annotations))
    report = tmp_path / "report"
    code = evaluate(photos / "a.png", photos / "val" / "c.png", photos / "val" / "b.jpg",
                    "-o", report, "--instances", coco, checkpoints=tiny_checkpoints)  # fmt: skip
    assert code == 0
    counts = {r["path"]: r["instances"] for r in read_csv(report / "metrics.csv")}
    assert counts == {"a.png": "1", "c.png": "1", "b.jpg": "0"}  # crowd and tiny box left out
    crops = read_csv(report / "instances.csv")
    assert [c["annotation_id"] for c in crops] == ["10", "13"]
    first = crops[0]
    # a.png is 96x64 scored at 256x256: x scale 256/96, y scale 4; outward rounding
    box = (math.floor(10 * 256 / 96), 32, math.ceil(60 * 256 / 96), 192)
    assert tuple(int(first[k]) for k in ("x1", "y1", "x2", "y2")) == box
    assert first["category"] == "dog"
    saved = np.asarray(Image.open(report / "images" / "a.png"))
    target = np.asarray(resize_to_network(Image.open(photos / "a.png").convert("RGB")))
    x1, y1, x2, y2 = box
    expected = psnr(
        np.ascontiguousarray(saved[y1:y2, x1:x2]), np.ascontiguousarray(target[y1:y2, x1:x2])
    )
    assert float(first["psnr"]) == pytest.approx(expected, rel=1e-12)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["instances"]["scored"] == 2
    assert summary["instances"]["skipped_too_small"] == 1
    assert summary["instances"]["metrics"]["ssim"]["count"] == 2
    assert "Instance level" in (report / "report.html").read_text()


def test_identical_images_are_reported_as_infinite_and_left_out(tmp_path: Path) -> None:
    photo = colour_photo(32, 32, 7)
    source = tmp_path / "same.png"
    photo.save(source)
    (tmp_path / "images").mkdir()
    resize_to_network(photo).save(tmp_path / "images" / "same.png")
    run = EvaluationRun(
        scores=[
            ImageScore(GroundTruth(source, "same.png"),
                       {"psnr": math.inf, "ssim": 1.0, "lpips": math.nan, "colorfulness": 5.0},
                       5.0, None),
            ImageScore(GroundTruth(source, "other.png"),
                       {"psnr": 30.0, "ssim": 0.9, "lpips": math.nan, "colorfulness": 4.0},
                       5.0, None),
        ],
        seconds=1.0,
    )  # fmt: skip
    summary = build_summary(
        run, {"resolution": "network"}, {"model_version": "m"}, {"device": "cpu"}
    )
    assert summary["metrics"]["psnr"] == {"mean": 30.0, "median": 30.0, "ci95_low": None,
                                          "ci95_high": None, "count": 1, "infinite": 1}  # fmt: skip
    json.dumps(summary, allow_nan=False)  # valid JSON: no NaN or Infinity literals
    run.scores = run.scores[:1]
    page = write_report_html(tmp_path, run, build_summary(run, {"resolution": "network"},
                             {"model_version": "m"}, {"device": "cpu"}), "network")  # fmt: skip
    assert "1 image(s) came out identical" in page.read_text()


def test_compare_flags_override_the_base_flags() -> None:
    from service.cli import build_parser

    args = build_parser().parse_args(
        ["evaluate", "x", "-o", "r", "--no-detector", "--precision", "fp32", "--compare", "a=",
         "b=--precision fp16 --resolution original --batch-size 1", "c=--detector-weights d.pth",
         "--batch-size", "16"]
    )  # fmt: skip
    a, b, c = parse_compare(args, args.compare)
    assert (a.args.precision, a.args.resolution, a.args.no_detector) == ("fp32", "network", True)
    assert (a.args.batch_size, b.args.batch_size, c.args.batch_size) == (16, 1, 16)
    assert (b.args.precision, b.args.resolution, b.args.no_detector) == ("fp16", "original", True)
    assert c.args.no_detector is False
    assert str(c.args.detector_weights) == "d.pth"
    assert (args.precision, args.batch_size) == ("fp32", 16)  # the base namespace is not changed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare", "bad name=--no-detector"], "NAME must be"),
        (["--compare", "a=", "a=--precision fp16"], "used twice"),
        (["--compare", "a=--frobnicate"], "unrecognized arguments"),
        (["--compare", "images="], "NAME must be"),
        (["--instances", "missing.json"], "cannot read"),
        (["--lpips-weights", "missing.pth"], "not found"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = evaluate(photos / "a.png", "-o", tmp_path / "r", *extra, checkpoints=tiny_checkpoints)
    assert code == 2
    assert message in capsys.readouterr().err


def test_no_images_is_a_usage_error(tmp_path: Path, tiny_checkpoints: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    assert evaluate(tmp_path / "empty", "-o", tmp_path / "r", checkpoints=tiny_checkpoints) == 2
    assert "no images found" in capsys.readouterr().err


def test_fid_over_the_set_with_local_inception_weights(
    photos: Path, tmp_path: Path, tiny_checkpoints: Path, fid_inception_weights: Path
) -> None:
    from evaluation.fid import FidFeatures, frechet_distance

    report = tmp_path / "report"
    code = evaluate(photos / "val", "-o", report, "--fid-weights", fid_inception_weights,
                    "--fid-dims", "64", checkpoints=tiny_checkpoints)  # fmt: skip
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["fid"]["images"] == 2
    assert summary["fid"]["dims"] == 64
    features = FidFeatures.from_inception_file(fid_inception_weights, dims=64)
    saved, targets = [], []
    for name in ("b.jpg", "c.png"):
        saved.append(
            features(np.asarray(Image.open(report / "images" / Path(name).with_suffix(".png"))))
        )
        with Image.open(photos / "val" / name) as photo:
            targets.append(features(np.asarray(resize_to_network(photo.convert("RGB")))))
    assert summary["fid"]["value"] == pytest.approx(frechet_distance(saved, targets), rel=1e-3)
    assert "FID (colorized set" in (report / "report.html").read_text()
