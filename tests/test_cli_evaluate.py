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


# -- quality against the number of hints (evaluate --hints 0,1,2,5,10) --------------------------


def np_rgb_to_ab(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (2, H, W) Lab ab in float64, the spec's constants (§5.4)."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])  # fmt: skip
    xyz = np.einsum("ij,hwj->ihw", m, lin) / np.array([0.95047, 1.0, 1.08883])[:, None, None]
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack((500 * (f[0] - f[1]), 200 * (f[1] - f[2])))


def documented_points(name: str, count: int, seed: int) -> list[tuple[int, int, int]]:
    """docs/hints.md's sampling, written again: one torch generator per photo seeded with
    crc32 of its images/ name (images/<key>.png) + seed * 2**32; per point a centre column and row uniform in 0..255,
    then a side uniform in 1..9."""
    import zlib

    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) + seed * 2**32)
    return [
        (int(torch.randint(0, 256, (), generator=generator)),
         int(torch.randint(0, 256, (), generator=generator)),
         int(torch.randint(1, 10, (), generator=generator)))
        for _ in range(count)
    ]  # fmt: skip


def painted_planes(
    points: list[tuple[int, int, int]], ab: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hint ab and 0/1 mask at 256x256 by hand: each side x side patch centred on its point (one
    more pixel after it for even sides, clipped), holding the ground truth's mean ab there;
    later points overwrite earlier ones."""
    planes, mask = np.zeros((2, 256, 256)), np.zeros((256, 256))
    for cx, cy, side in points:
        before = (side - 1) // 2
        top, left = max(0, cy - before), max(0, cx - before)
        bottom, right = min(256, cy - before + side), min(256, cx - before + side)
        planes[:, top:bottom, left:right] = ab[:, top:bottom, left:right].mean(axis=(1, 2))[
            :, None, None
        ]
        mask[top:bottom, left:right] = 1.0
    return planes, mask


@pytest.fixture
def hint_photos(tmp_path: Path) -> Path:
    root = tmp_path / "truth"
    root.mkdir()
    colour_photo(48, 32, 11).save(root / "a.png")
    colour_photo(40, 40, 12).save(root / "b.png")
    colour_photo(36, 28, 13).save(root / "c.png")
    return root


def test_hint_sweep_reports_quality_per_count_with_the_documented_sampling(
    hint_photos: Path, tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate --hints 0,1,2,5,10 with seeded SIGGRAPH17 weights: one report per count, the
    sweep's table, and the network input of every photo at every count is the hand-painted
    ground-truth patch means at the documented points (counts nested, area monotonic)."""
    import torch

    from models.networks import FullImageGenerator

    inputs: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if isinstance(module, FullImageGenerator):
            inputs.append(args[0].detach().float().clone())

    report, counts, seed = tmp_path / "report", [0, 1, 2, 5, 10], 3
    handle = torch.nn.modules.module.register_module_forward_pre_hook(keep)
    try:
        code = main(["evaluate", str(hint_photos), "-o", str(report), "--model",
                     "zhang-siggraph17", "--weights-dir", str(zoo_weights), "--precision",
                     "fp32", "--no-progress", "--batch-size", "8", "--hints", "10,0,2,1,5",
                     "--seed", str(seed)])  # fmt: skip
    finally:
        handle.remove()
    assert code == 0, capsys.readouterr().err
    assert "quality against 5 hint counts" in capsys.readouterr().out
    names = ["a.png", "b.png", "c.png"]
    assert len(inputs) == len(counts)  # one batch of the three photos per count
    truth = {}
    for name in names:
        with Image.open(hint_photos / name) as photo:
            truth[name] = np_rgb_to_ab(np.asarray(resize_to_network(photo.convert("RGB"))))
    sizes = {"a.png": (48, 32), "b.png": (40, 40), "c.png": (36, 28)}
    areas: dict[str, list[float]] = {name: [] for name in names}
    previous: dict[str, np.ndarray] = {}
    for count, batch in zip(counts, inputs, strict=True):
        folder = report / f"hints-{count}"
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["config"]["hints"], summary["config"]["seed"]) == (count, seed)
        assert [r["path"] for r in read_csv(folder / "metrics.csv")] == names
        placed = read_csv(folder / "hints.csv") if count else []
        assert (folder / "hints.csv").exists() == bool(count)
        for k, name in enumerate(names):
            points = documented_points(f"images/{name}", count, seed)  # images/<key>.png
            rows = [r for r in placed if r["path"] == name]
            assert len(rows) == count
            width, height = sizes[name]
            for row, (cx, cy, side) in zip(rows, points, strict=True):
                assert float(row["x"]) == pytest.approx((cx + 0.5) * width / 256)
                assert float(row["y"]) == pytest.approx((cy + 0.5) * height / 256)
                assert int(row["size"]) == side
            planes, mask = painted_planes(points, truth[name])
            x = batch[k].numpy()
            np.testing.assert_allclose(x[1:3] * 110, planes, atol=2e-3)  # ab / 110 in the input
            np.testing.assert_array_equal(x[3], mask)  # the release's mask: 1 hinted, 0 not
            areas[name].append(mask.sum())
            if name in previous:  # more hints only add points: the hinted area only grows
                assert np.all(mask >= previous[name])
            previous[name] = mask
    for name in names:
        assert areas[name][0] == 0 and areas[name] == sorted(areas[name])
        assert areas[name][-1] > areas[name][1] > 0
    sweep = json.loads((report / "hints.json").read_text())
    assert sweep["counts"] == counts and sweep["baseline"] == 0 and sweep["seed"] == seed
    assert sweep["paired_images"] == 3
    assert sweep["computed_metrics"] == ["psnr", "ssim", "colorfulness"]  # no LPIPS file
    base = [float(r["psnr"]) for r in read_csv(report / "hints-0" / "metrics.csv")]
    for row, count in zip(sweep["rows"], counts, strict=True):
        assert row["hints"] == count and row["report"] == f"hints-{count}/report.html"
        psnr = [float(r["psnr"]) for r in read_csv(report / f"hints-{count}" / "metrics.csv")]
        assert row["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(psnr))
        assert row["hinted_pixels"]["mean"] == pytest.approx(
            np.mean([areas[n][counts.index(count)] for n in names])
        )
        if count == 0:
            assert row["difference"] is None
        else:
            difference = row["difference"]["psnr"]
            assert difference["mean"] == pytest.approx(np.mean(np.subtract(psnr, base)))
    table = (report / "hints.md").read_text().splitlines()
    assert table[0].startswith("| hints | hinted pixels (mean, of 65,536) | PSNR (dB) ↑ |")
    assert [line.split("|")[1].strip() for line in table[2:]] == [str(c) for c in counts]
    assert "baseline" in table[2]
    assert_self_contained(report / "hints.html")
    with Image.open(report / "report_files" / "hints_curve.png") as curve:
        assert curve.format == "PNG" and curve.width > 300


def test_hint_sweep_with_a_network_that_copies_hints_improves_with_every_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A constructed SIGGRAPH17 network whose output is its hint ab (grey where unhinted), on
    flat-colour photos: every revealed pixel comes back right, so PSNR rises with the count."""
    import torch
    from test_hints import hint_copying_generator

    from models.registry import get_model

    weights = tmp_path / "weights"
    (path,) = get_model("zhang-siggraph17").weight_paths(weights)
    path.parent.mkdir(parents=True)
    torch.save(hint_copying_generator().state_dict(), path)
    truth = tmp_path / "truth"
    truth.mkdir()
    for i, colour in enumerate([(200, 60, 40), (40, 150, 60), (60, 80, 200)]):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(truth / f"flat{i}.png")
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "report"), "--model",
                 "zhang-siggraph17", "--weights-dir", str(weights), "--precision", "fp32",
                 "--no-progress", "--hints", "0,5,20,60"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    sweep = json.loads((tmp_path / "report" / "hints.json").read_text())
    means = [row["metrics"]["psnr"]["mean"] for row in sweep["rows"]]
    assert means == sorted(means) and len(set(means)) == 4, means
    for row in sweep["rows"][1:]:
        assert row["difference"]["psnr"]["mean"] > 0
    per_image = [
        [float(r["psnr"]) for r in read_csv(tmp_path / "report" / f"hints-{n}" / "metrics.csv")]
        for n in (0, 5, 20, 60)
    ]
    assert all(list(col) == sorted(col) for col in zip(*per_image, strict=True)), per_image


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--hints", "0,0"], "given twice"),
        (["--hints", "65"], "between 0 and 64"),
        (["--hints", "0,x"], "comma-separated list"),
        (["--hints", "0,5", "--compare", "a="], "cannot be combined with --compare"),
        (["--compare", "a=--hints 0,5"], "one --hints count per configuration"),
        (["--seed", "-1"], "at least 0"),
    ],
)
def test_hint_sweep_usage_errors_exit_2_with_a_message(
    hint_photos: Path, tmp_path: Path, zoo_weights: Path, extra: list[str], message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    try:  # argparse refuses a bad value itself (SystemExit 2), the command the combinations
        code = main(["evaluate", str(hint_photos), "-o", str(tmp_path / "r"), "--model",
                     "zhang-siggraph17", "--weights-dir", str(zoo_weights), "--no-progress",
                     *extra])  # fmt: skip
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_hint_sweep_is_refused_for_a_model_without_hints(
    hint_photos: Path, tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", str(hint_photos), "-o", str(tmp_path / "r"), "--model",
                 "zhang-eccv16", "--weights-dir", str(zoo_weights), "--no-progress",
                 "--hints", "0,5"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "takes no colour hints" in err and "zhang-siggraph17" in err
    assert not (tmp_path / "r").exists()
