"""``python -m service colorize``: folders, bad files, --boxes, sizes, formats, weights errors.

Runs in-process through ``service.cli.main`` on the tiny checkpoints (plus one real subprocess and
one run with the random-weight detector).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.boxes import Detections
from models.pipeline import ColorizeOptions, Colorizer
from service.cli import main

REPO = Path(__file__).resolve().parents[1]


def gray(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, axis=0)
    noise = rng.normal(0, 20, (height, width))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="L")


def colorize(*args: str | Path, checkpoints: Path | None = None, detector: bool = False) -> int:
    argv = ["colorize", *map(str, args), "--no-progress"]
    if checkpoints is not None:
        argv += ["--checkpoints", str(checkpoints)]
    if not detector and "--detector-weights" not in argv:
        argv.append("--no-detector")
    return main(argv)


def files_below(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """A small photo archive: nested folders, mixed formats and sizes, and a non-image file."""
    root = tmp_path / "archive"
    (root / "1950" / "summer").mkdir(parents=True)
    gray(120, 90, 1).save(root / "portrait.jpg", quality=90)
    gray(64, 100, 2).save(root / "1950" / "street.png")
    gray(80, 80, 3).save(root / "1950" / "summer" / "beach.webp")
    gray(50, 40, 4).save(root / "1950" / "summer" / "scan.tif")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_is_scanned_recursively_and_mirrored(
    archive: Path, tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "colorize",
            str(archive),
            "-o",
            str(out),
            "--checkpoints",
            str(tiny_checkpoints),
            "--no-detector",
            "--batch-size",
            "3",
        ]
    )
    assert code == 0
    assert files_below(out) == [
        "1950/street.png",
        "1950/summer/beach.png",
        "1950/summer/scan.png",
        "portrait.png",
    ]
    for source, output in [
        ("portrait.jpg", "portrait.png"),
        ("1950/street.png", "1950/street.png"),
    ]:
        with Image.open(archive / source) as src, Image.open(out / output) as result:
            assert result.size == src.size  # --resolution original is the default
            assert result.mode == "RGB"
            pixels = np.asarray(result, dtype=np.int16)
            assert (pixels.max(axis=2) - pixels.min(axis=2)).max() > 0  # coloured, not gray
    captured = capsys.readouterr()
    assert "4/4" in captured.err  # the progress bar went to stderr
    assert "4 colorized, 0 failed, 0 skipped" in captured.out


def test_bad_files_are_reported_and_the_rest_written(
    archive: Path, tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gray(40, 40).save(archive / "cut.png")
    (archive / "cut.png").write_bytes((archive / "cut.png").read_bytes()[:60])  # truncated
    Image.new("F", (20, 20)).save(archive / "float.tif")  # decodes, unsupported pixel format
    out = tmp_path / "out"
    assert colorize(archive, "-o", out, "--batch-size", "2", checkpoints=tiny_checkpoints) == 1
    assert files_below(out) == [
        "1950/street.png",
        "1950/summer/beach.png",
        "1950/summer/scan.png",
        "portrait.png",
    ]  # no temporary files either
    captured = capsys.readouterr()
    for name in ("broken.jpg", "cut.png", "float.tif"):
        assert f"failed: {archive / name}" in captured.err
    assert "floating-point" in captured.err
    assert "4 colorized, 3 failed" in captured.out


def test_boxes_file_matches_the_library(
    tmp_path: Path, tiny_checkpoints: Path, tiny_colorizer: Colorizer
) -> None:
    photo = gray(160, 120, 7)
    photo.save(tmp_path / "family.png")
    photo.save(tmp_path / "other.png")
    boxes = [[10, 10, 80, 110], [70, 20, 150, 100]]
    (tmp_path / "boxes.json").write_text(
        json.dumps({"family.png": {"boxes": boxes, "scores": [0.9, 0.8]}})
    )
    out = tmp_path / "out"
    code = colorize(
        tmp_path / "family.png",
        tmp_path / "other.png",
        "-o",
        out,
        "--boxes",
        tmp_path / "boxes.json",
        "--precision",  # what tiny_colorizer runs: the default `auto` is bf16 on some CPUs
        "fp32",
        checkpoints=tiny_checkpoints,
    )
    assert code == 0
    with_boxes = ColorizeOptions(boxes=Detections.from_boxes(boxes, [0.9, 0.8]))
    expected = tiny_colorizer.colorize([photo, photo], [with_boxes, ColorizeOptions()])
    family = np.asarray(Image.open(out / "family.png"))
    other = np.asarray(Image.open(out / "other.png"))
    np.testing.assert_array_equal(family, np.asarray(expected[0].image))
    np.testing.assert_array_equal(other, np.asarray(expected[1].image))
    assert not np.array_equal(family, other)  # the boxes went through the fusion network


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a.png": [[0, 0, 5, 5]]}', 'expected an object with a "boxes" list'),
        ('{"a.png": {"boxes": [[0, 0, 5]]}}', "box 0 must be four finite numbers"),
        ('{"a.png": {"boxes": [[0, 0, 5, 5]], "scores": [1, 2]}}', "1 boxes but 2 scores"),
        ('{"a.png": {"boxes": [[0, 0, "5", 5]]}}', "must be numbers"),
        ('{"a.png": {"boxes": [], "labels": []}}', "unknown fields"),
    ],
)
def test_invalid_boxes_file(
    tmp_path: Path,
    tiny_checkpoints: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    (tmp_path / "boxes.json").write_text(content)
    code = colorize(
        tmp_path / "a.png",
        "-o",
        tmp_path / "out",
        "--boxes",
        tmp_path / "boxes.json",
        checkpoints=tiny_checkpoints,
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resolution_network_and_original(tmp_path: Path, tiny_checkpoints: Path) -> None:
    gray(300, 200).save(tmp_path / "wide.png")
    assert (
        colorize(
            tmp_path / "wide.png",
            "-o",
            tmp_path / "net",
            "--resolution",
            "network",
            checkpoints=tiny_checkpoints,
        )
        == 0
    )
    assert (
        colorize(tmp_path / "wide.png", "-o", tmp_path / "orig", checkpoints=tiny_checkpoints) == 0
    )
    assert Image.open(tmp_path / "net" / "wide.png").size == (256, 256)
    assert Image.open(tmp_path / "orig" / "wide.png").size == (300, 200)


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_output_formats_and_transparency(
    tmp_path: Path, tiny_checkpoints: Path, fmt: str, pil_format: str
) -> None:
    alpha = Image.new("L", (64, 48), 0)
    alpha.paste(255, (8, 8, 56, 40))
    Image.merge("LA", (gray(64, 48), alpha)).save(tmp_path / "logo.png")
    out = tmp_path / "out"
    assert (
        colorize(tmp_path / "logo.png", "-o", out, "--format", fmt, checkpoints=tiny_checkpoints)
        == 0
    )
    with Image.open(out / f"logo.{fmt}") as result:
        assert result.format == pil_format
        assert result.size == (64, 48)
        if fmt == "jpeg":  # no alpha in JPEG: flattened onto white
            assert result.mode == "RGB"
            corner = np.asarray(result)[0, 0]
            assert (corner > 240).all()
        else:
            assert result.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(result.getchannel("A")), np.asarray(alpha))


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_files_are_encoded_by_the_http_encoder_at_quality_95(tmp_path: Path, fmt: str) -> None:
    """One encoder: the CLI's bytes are the HTTP API's for the same format and quality."""
    from PIL import JpegImagePlugin

    from service.commands.colorize import QUALITY, write_image
    from service.engine.encode import encode_image

    image = Image.merge("RGB", (gray(64, 48, 1), gray(64, 48, 2), gray(64, 48, 3)))
    write_image(image, tmp_path / f"out.{fmt}", fmt)  # type: ignore[arg-type]
    assert QUALITY == 95
    assert (tmp_path / f"out.{fmt}").read_bytes() == encode_image(image, fmt, 95)[0]  # type: ignore[arg-type]
    if fmt == "jpeg":
        with Image.open(tmp_path / "out.jpeg") as written:
            assert (
                JpegImagePlugin.get_sampling(written) == 2
            )  # 4:2:0, as the HTTP API has always sent


def test_same_stems_are_kept_apart(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    (folder / "x").mkdir(parents=True)
    (folder / "y").mkdir()
    gray(30, 30, 1).save(folder / "a.png")
    gray(30, 30, 2).save(folder / "a.jpg")
    gray(30, 30, 3).save(folder / "x" / "b.png")
    gray(30, 30, 4).save(folder / "y" / "b.png")
    out = tmp_path / "out"
    assert colorize(folder, "-o", out, checkpoints=tiny_checkpoints) == 0
    assert files_below(out) == ["a.jpg.png", "a.png.png", "x/b.png", "y/b.png"]

    # the same name from two folders given as files cannot be told apart: refused before any work
    code = colorize(
        folder / "x" / "b.png",
        folder / "y" / "b.png",
        "-o",
        tmp_path / "flat",
        checkpoints=tiny_checkpoints,
    )
    assert code == 2
    assert "same output file" in capsys.readouterr().err
    assert not (tmp_path / "flat").exists()


def test_output_inside_the_input_folder_is_not_rescanned(
    tmp_path: Path, tiny_checkpoints: Path
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    out = tmp_path / "colorized"
    assert colorize(tmp_path, "-o", out, checkpoints=tiny_checkpoints) == 0
    assert colorize(tmp_path, "-o", out, checkpoints=tiny_checkpoints) == 0
    assert files_below(out) == ["a.png"]


def test_never_overwrites_an_input(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert colorize(tmp_path / "a.png", "-o", tmp_path, checkpoints=tiny_checkpoints) == 2
    assert "would replace its input" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == before


def test_skip_existing(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gray(30, 30, 1).save(tmp_path / "a.png")
    gray(30, 30, 2).save(tmp_path / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"kept")
    assert (
        colorize(
            tmp_path / "a.png",
            tmp_path / "b.png",
            "-o",
            out,
            "--skip-existing",
            checkpoints=tiny_checkpoints,
        )
        == 0
    )
    assert (out / "a.png").read_bytes() == b"kept"
    assert "1 colorized, 0 failed, 1 skipped" in capsys.readouterr().out


def test_missing_checkpoints_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    code = colorize(tmp_path / "a.png", "-o", tmp_path / "out", checkpoints=tmp_path / "none")
    assert code == 2
    err = capsys.readouterr().err
    assert "missing weight files" in err
    # named where fetch-weights puts them under a checkpoints folder
    assert str(tmp_path / "none" / "coco_finetuned_mask_256_ffs" / "latest_net_GF.pth") in err
    assert "python -m service fetch-weights" in err


def test_missing_weights_of_a_model_without_published_ones_says_to_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    argv = ["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--no-progress",
            "--model", "zhao-pixelated", "--weights-dir", str(tmp_path / "w")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "w" / "zhao-pixelated" / "zhao_pixelated.pth") in err
    assert "train --model zhao-pixelated" in err
    assert "fetch-weights" not in err  # nothing to download for it


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-instances", "9"], "above the instance limit 8"),
        (["--score-threshold", "1.5"], "must be between 0 and 1"),
        (["--batch-size", "0"], "must be at least 1"),
    ],
)
def test_option_errors(
    tmp_path: Path,
    tiny_checkpoints: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    try:
        code = colorize(
            tmp_path / "a.png", "-o", tmp_path / "out", *extra, checkpoints=tiny_checkpoints
        )
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def test_no_images_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("x")
    assert colorize(tmp_path / "in", "-o", tmp_path / "out") == 2
    assert "no images found" in capsys.readouterr().err
    assert colorize(tmp_path / "nowhere.png", "-o", tmp_path / "out") == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_mmagic_checkpoint_file(tmp_path: Path, tiny_mmagic: Path, tiny_checkpoints: Path) -> None:
    """The MMagic single file holds the same seeded networks: identical output."""
    gray(90, 70).save(tmp_path / "a.png")
    assert colorize(tmp_path / "a.png", "-o", tmp_path / "mm", checkpoints=tiny_mmagic) == 0
    assert colorize(tmp_path / "a.png", "-o", tmp_path / "off", checkpoints=tiny_checkpoints) == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "mm" / "a.png")),
        np.asarray(Image.open(tmp_path / "off" / "a.png")),
    )


def test_settings_from_environment(
    tmp_path: Path, tiny_checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLORIZE_CHECKPOINTS", str(tiny_checkpoints))
    monkeypatch.setenv("COLORIZE_DETECTOR", "false")
    gray(30, 30).save(tmp_path / "a.png")
    assert (
        main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--no-progress"])
        == 0
    )
    assert (tmp_path / "out" / "a.png").is_file()


@pytest.mark.slow
def test_with_random_detector(
    tmp_path: Path, tiny_checkpoints: Path, detector_weights: Path, gray_photo: Image.Image
) -> None:
    """The detector path end to end: random Mask R-CNN weights find boxes at a low threshold."""
    gray_photo.save(tmp_path / "scene.png")
    code = colorize(
        tmp_path / "scene.png",
        "-o",
        tmp_path / "out",
        "--detector-weights",
        detector_weights,
        "--score-threshold",
        "0.05",
        checkpoints=tiny_checkpoints,
    )
    assert code == 0
    assert (
        colorize(tmp_path / "scene.png", "-o", tmp_path / "plain", checkpoints=tiny_checkpoints)
        == 0
    )
    detected = np.asarray(Image.open(tmp_path / "out" / "scene.png"))
    assert detected.shape[:2] == (gray_photo.height, gray_photo.width)
    # boxes were found, so the fusion network ran instead of the full-image network
    assert not np.array_equal(detected, np.asarray(Image.open(tmp_path / "plain" / "scene.png")))


@pytest.mark.slow
def test_real_subprocess(tmp_path: Path, tiny_checkpoints: Path) -> None:
    gray(40, 30).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    env = {**os.environ, "COLORIZE_LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "colorize",
            str(tmp_path),
            "-o",
            str(tmp_path / "out"),
            "--checkpoints",
            str(tiny_checkpoints),
            "--no-detector",
            "--format",
            "jpeg",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "1 colorized, 1 failed" in result.stdout
    assert "bad.png" in result.stderr
    assert "%|" in result.stderr  # tqdm's bar
    assert Image.open(tmp_path / "out" / "a.jpeg").format == "JPEG"


def _auto_against_the_library(tmp_path: Path, checkpoints: Path) -> tuple[np.ndarray, Colorizer]:
    """The command line's default precision (``auto``) and the library's ``precision="auto"``
    follow one rule, so on any CPU they give the same pixels."""
    photo = gray(96, 72, 11)
    photo.save(tmp_path / "a.png")
    assert colorize(tmp_path / "a.png", "-o", tmp_path / "out", checkpoints=checkpoints) == 0
    saved = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    library = Colorizer.load(checkpoints, precision="auto")
    np.testing.assert_array_equal(saved, np.asarray(library.colorize([photo])[0].image))
    return saved, library


def test_default_precision_is_the_librarys_auto(tmp_path: Path, tiny_checkpoints: Path) -> None:
    _auto_against_the_library(tmp_path, tiny_checkpoints)


@pytest.mark.native_bf16
def test_auto_runs_bf16_on_a_cpu_with_native_bf16(
    tmp_path: Path, tiny_checkpoints: Path, tiny_colorizer: Colorizer
) -> None:
    saved, library = _auto_against_the_library(tmp_path, tiny_checkpoints)
    assert library.precision == "bf16"
    assert library.full_image_net.model1[0].weight.dtype == torch.bfloat16
    fp32 = np.asarray(tiny_colorizer.colorize([gray(96, 72, 11)])[0].image, dtype=int)
    difference = np.abs(saved.astype(int) - fp32)
    # docs/performance.md's bf16 tolerance on the networks' ab: mean 0.01, max 0.1 (normalised,
    # ab / 110), i.e. about 1.1 and 11 Lab ab units; near grey at mid lightness (these tiny
    # networks' colours) one ab unit moves an sRGB channel by about 2 of 255 steps: a mean of 2
    # and a maximum of 25 steps (this AVX512-BF16 CPU measured 0.3 and 2)
    assert difference.max() > 0  # bf16 really ran
    assert difference.mean() <= 2
    assert difference.max() <= 25


@pytest.mark.parametrize("batch_size", [1, 3])
def test_the_pipelined_runner_writes_the_sequential_runners_bytes(
    archive: Path, tmp_path: Path, tiny_colorizer: Colorizer, batch_size: int
) -> None:
    """``process`` through the overlapped pipeline (a load pool, a finish thread) and through the
    sequential schedule: the same files, byte for byte, and the same failures in the same order.
    (On a 2-core CPU ``default_plan`` is the sequential schedule, so the CLI tests above would not
    exercise the overlap: this one forces it.)"""
    from models.offline import SEQUENTIAL_PLAN, PipelinePlan
    from service.commands.colorize import collect_jobs, process

    (archive / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("F", (20, 20)).save(archive / "float.tif")
    outputs = {}
    for name, plan in (("sequential", SEQUENTIAL_PLAN), ("pipeline", PipelinePlan(2, 3, 1))):
        jobs = collect_jobs([archive], tmp_path / name, ".png")
        summary = process(tiny_colorizer, jobs, lambda job: ColorizeOptions(),
                          batch_size=batch_size, image_format="png", progress=False,
                          plan=plan)  # fmt: skip
        files = {p: (tmp_path / name / p).read_bytes() for p in files_below(tmp_path / name)}
        outputs[name] = (summary.written, summary.failures, files)
    assert outputs["pipeline"] == outputs["sequential"]
    written, failures, files = outputs["pipeline"]
    assert written == len(files) == 4
    assert sorted(Path(source).name for source, _ in failures) == ["broken.jpg", "float.tif"]
