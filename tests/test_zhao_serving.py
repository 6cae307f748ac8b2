"""zhao-pixelated through the zoo loader, the pipeline and POST /colorize: samples and seed.

A narrow seeded model (``divisor`` 16, a 2-layer generator) written in the training's file
layout and loaded by the real loader; the full-size networks are tests/test_zhao_pixelated.py's.
"""

from __future__ import annotations

import base64
import io
import time
from dataclasses import replace
from pathlib import Path

import image_corpus as corpus
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import running_app, service_settings
from weight_files import ZHAO_TINY, write_official, write_zhao

from models.checkpoints import CheckpointError
from models.pipeline import ColorizeOptions, Colorizer, OptionsError
from models.registry import MODELS, get_model
from models.zhao_pipeline import ZhaoPipeline
from models.zhao_pixelated import FILENAME, MAX_SAMPLES
from models.zoo import load_colorizer
from service.core.admission import CostModel
from service.core.jobs import (
    SAMPLES_LIMIT,
    SAMPLING_MODELS,
    Job,
    JobOptions,
    JobResult,
    samples_limit,
)
from service.queues.redis.protocol import decode_answer, encode_answer

TINY = ZHAO_TINY


@pytest.fixture(scope="module")
def zhao_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zhao-weights")
    write_official(root / "checkpoints", width=8, seed=0)
    write_zhao(root, seed=4)
    return root


def test_registry_entry_and_strict_loading(zhao_weights: Path, tmp_path: Path) -> None:
    spec = get_model("zhao-pixelated")
    assert spec.max_samples == MAX_SAMPLES == SAMPLES_LIMIT
    sampling = {name: s.max_samples for name, s in MODELS.items() if s.max_samples > 1}
    assert sampling == SAMPLING_MODELS  # the API's copy (it imports no torch) is the registry's
    assert samples_limit(["instcolor"]) == 1 and samples_limit(["instcolor", spec.name]) == 8
    assert not spec.published and spec.input_size == 128 and not spec.uses_detector
    assert spec.weight_paths("W") == (Path("W/zhao-pixelated") / FILENAME,)
    model = spec.load(zhao_weights)
    assert model.config == TINY
    with pytest.raises(CheckpointError, match="no official weights"):
        spec.load(tmp_path)
    broken = torch.load(zhao_weights / "zhao-pixelated" / FILENAME, weights_only=True)
    broken["state_dict"].pop("generator.out2.bias")
    (tmp_path / "zhao-pixelated").mkdir()
    torch.save(broken, tmp_path / "zhao-pixelated" / FILENAME)
    with pytest.raises(CheckpointError, match="missing"):
        spec.load(tmp_path)


def test_pipeline_samples_are_seeded_and_diverse(zhao_weights: Path) -> None:
    pipeline = load_colorizer("zhao-pixelated", zhao_weights)
    assert isinstance(pipeline, ZhaoPipeline)
    photo = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    options = ColorizeOptions(samples=3, seed=9)
    (first,) = pipeline.colorize([photo], options)
    assert first.seed == 9 and len(first.samples) == 2
    images = [first.image, *first.samples]
    assert all(image.size == (96, 64) for image in images)
    arrays = [np.asarray(image) for image in images]
    assert not np.array_equal(arrays[0], arrays[1])
    # the same seed gives the same samples, also with another image in the batch
    other = Image.linear_gradient("L").rotate(90).resize((50, 70)).convert("RGB")
    again, _ = pipeline.colorize([photo, other], [options, ColorizeOptions(samples=1, seed=1)])
    assert all(
        np.array_equal(a, np.asarray(b))
        for a, b in zip(arrays, [again.image, *again.samples], strict=True)
    )
    # every sample goes through the product's merge: saturation 0 gives the input's grey
    (grey,) = pipeline.colorize([photo], ColorizeOptions(samples=2, seed=9, saturation=0.0))
    for image in (grey.image, *grey.samples):
        rgb = np.asarray(image).astype(int)
        assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 1
    (drawn,) = pipeline.colorize([photo], ColorizeOptions(samples=1))
    assert drawn.seed is not None and not drawn.samples
    with pytest.raises(OptionsError, match="samples must be between 1 and 8"):
        pipeline.check_options(ColorizeOptions(samples=MAX_SAMPLES + 1))


def test_models_that_do_not_sample_refuse_samples(tiny_colorizer: Colorizer) -> None:
    with pytest.raises(OptionsError, match="needs a sampling model"):
        tiny_colorizer.check_options(ColorizeOptions(samples=2))


async def test_colorize_samples_json(zhao_weights: Path) -> None:
    settings = service_settings(
        zhao_weights / "checkpoints", weights_dir=zhao_weights, models="instcolor,zhao-pixelated"
    )
    image = corpus.png(80, 60)
    png = {"content-type": "image/png"}
    json_headers = {**png, "accept": "application/json"}
    async with running_app(settings) as (_, client):
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert listed["zhao-pixelated"]["max_samples"] == 8
        assert listed["instcolor"]["max_samples"] == 1
        url = "/colorize?model=zhao-pixelated&samples=3&seed=7"
        answer = await client.post(url, content=image, headers=json_headers)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["seed"] == 7 and body["model"] == "zhao-pixelated"
        samples = body["samples"]
        assert [s["index"] for s in samples] == [0, 1, 2]
        assert samples[0]["image_base64"] == body["image_base64"]
        decoded = [Image.open(io.BytesIO(base64.b64decode(s["image_base64"]))) for s in samples]
        assert all(d.size == (80, 60) for d in decoded)
        assert len({s["image_base64"] for s in samples}) == 3  # diverse
        again = (await client.post(url, content=image, headers=json_headers)).json()
        assert [s["image_base64"] for s in again["samples"]] == [s["image_base64"] for s in samples]

        unseeded = await client.post(
            "/colorize?model=zhao-pixelated", content=image, headers=json_headers
        )
        assert unseeded.status_code == 200
        assert isinstance(unseeded.json()["seed"], int) and len(unseeded.json()["samples"]) == 1

        for query, message in (
            ("model=zhao-pixelated&samples=2", "Accept: application/json"),
            ("model=zhao-pixelated&samples=9", "samples"),
            ("model=zhao-pixelated&seed=-1", "seed"),
        ):
            refused = await client.post(f"/colorize?{query}", content=image, headers=png)
            assert refused.status_code == 422, query
            assert refused.headers["content-type"] == "application/problem+json"
            assert message in refused.json()["detail"]
        other = await client.post("/colorize?samples=2", content=image, headers=json_headers)
        assert other.status_code == 422
        assert "needs a sampling model" in other.json()["detail"]
        plain = (await client.post("/colorize", content=image, headers=json_headers)).json()
        assert plain["samples"] is None and plain["seed"] is None


def _job(samples: int, pixels: int = 1_000_000) -> Job:
    now = time.time()
    return Job("r", b"", JobOptions(samples=samples), now + 10, now, pixels=pixels)


def test_admission_counts_each_sample_as_a_unit() -> None:
    costs = CostModel()
    result = JobResult(b"", "image/png", [], [], {"fusion": 8.0, "merge": 0.5, "encode": 0.5}, "v")
    costs.observe_batch([(_job(4), result)])  # 4 samples took 8 s on the device
    assert costs.seconds_per_pass == pytest.approx(2.0)
    assert costs.seconds_per_megapixel == pytest.approx(1.0 / 4)
    assert costs.estimate(_job(4)) == pytest.approx(4 * costs.estimate(_job(1)))
    assert costs.estimate(_job(1)) == pytest.approx(0.25 + 2.0)


def test_redis_frames_carry_samples_only_when_there_are_any() -> None:
    plain = JobResult(b"img", "image/png", [], [], {}, "v")
    frame = encode_answer(plain)
    assert b"seed" not in frame.split(b"\n", 1)[0]
    assert decode_answer(frame) == plain
    sampled = replace(plain, seed=3, samples_base64=["aGk="])
    assert decode_answer(encode_answer(sampled)) == sampled


def test_evaluate_compare_with_zhao_is_reproducible(
    zhao_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate --compare inst= "zhao=--model zhao-pixelated"``: one report per model, and the
    sampling model's scores are the same on a second run (evaluate samples with seed 0)."""
    import csv
    import json

    from service.cli import main

    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    common = ["--no-progress", "--no-detector", "--precision", "fp32",
              "--weights-dir", str(zhao_weights)]  # fmt: skip
    scores = []
    for run in ("a", "b"):
        report = tmp_path / run
        code = main(["evaluate", str(photos), "-o", str(report), "--compare", "inst=",
                     "zhao=--model zhao-pixelated", *common])  # fmt: skip
        assert code == 0
        summary = json.loads((report / "zhao" / "summary.json").read_text())
        assert summary["config"]["model"] == "zhao-pixelated"
        with (report / "zhao" / "metrics.csv").open(newline="") as handle:
            scores.append([r["psnr"] for r in csv.DictReader(handle)])
        comparison = json.loads((report / "comparison.json").read_text())
        assert {r["name"] for r in comparison["metrics"]["psnr"]["rows"]} == {"inst", "zhao"}
    assert scores[0] == scores[1] and len(scores[0]) == 2


def test_colorize_command_writes_each_sample(
    zhao_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``colorize --model zhao-pixelated --samples 3 --seed 7``: ``<stem>.s0.png`` ...
    ``<stem>.s2.png`` per input, each the library's sample with that seed (PNG is lossless);
    without ``--seed`` the run's seed is printed and draws the same files again; models that do
    not sample refuse ``--samples`` and ``--seed`` (exit 2)."""
    from service.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    first = Image.linear_gradient("L").resize((48, 40)).convert("RGB")
    second = Image.linear_gradient("L").rotate(90).resize((40, 56))
    first.save(photos / "a.png")
    second.save(photos / "b.jpg", quality=95)
    common = ["--no-progress", "--no-detector", "--precision", "fp32",
              "--weights-dir", str(zhao_weights), "--model", "zhao-pixelated"]  # fmt: skip
    out = tmp_path / "out"
    args = ["colorize", str(photos), "-o", str(out), *common]
    assert main([*args, "--samples", "3", "--seed", "7"]) == 0
    assert "seed 7" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{stem}.s{i}.png" for stem in "ab" for i in range(3)]

    pipeline = load_colorizer("zhao-pixelated", zhao_weights)
    for name in ("a.png", "b.jpg"):
        with Image.open(photos / name) as photo:
            photo.load()
            (expected,) = pipeline.colorize([photo], ColorizeOptions(samples=3, seed=7))
        for i, image in enumerate((expected.image, *expected.samples)):
            written = np.asarray(Image.open(out / f"{Path(name).stem}.s{i}.png").convert("RGB"))
            assert np.array_equal(written, np.asarray(image.convert("RGB"))), (name, i)

    drawn_out = tmp_path / "drawn"
    assert main(["colorize", str(photos / "a.png"), "-o", str(drawn_out), *common,
                 "--samples", "2"]) == 0  # fmt: skip
    summary = capsys.readouterr().out
    seed = int(summary.split("seed ")[1].split(")")[0])
    again = tmp_path / "again"
    assert main(["colorize", str(photos / "a.png"), "-o", str(again), *common,
                 "--samples", "2", "--seed", str(seed)]) == 0  # fmt: skip
    for i in range(2):
        assert (drawn_out / f"a.s{i}.png").read_bytes() == (again / f"a.s{i}.png").read_bytes()
    # --skip-existing: an input is left only when all its samples are there
    (again / "a.s1.png").unlink()
    assert main(["colorize", str(photos / "a.png"), "-o", str(again), *common,
                 "--samples", "2", "--seed", str(seed), "--skip-existing"]) == 0  # fmt: skip
    assert "1 colorized" in capsys.readouterr().out
    assert (drawn_out / "a.s1.png").read_bytes() == (again / "a.s1.png").read_bytes()

    plain = ["colorize", str(photos), "-o", str(tmp_path / "no"), "--no-progress",
             "--no-detector", "--weights-dir", str(zhao_weights)]  # fmt: skip
    for extra, flag in ((["--samples", "2"], "--samples"), (["--seed", "3"], "--seed")):
        assert main([*plain, *extra]) == 2
        error = capsys.readouterr().err
        assert f"{flag}: model 'instcolor' gives one colouring per image" in error
        assert "zhao-pixelated" in error
    assert not (tmp_path / "no").exists()
    for bad in ("9", "0"):
        with pytest.raises(SystemExit) as refused:
            main([*args, "--samples", bad])
        assert refused.value.code == 2
        assert "must be between 1 and 8" in capsys.readouterr().err
    # --engine ray refuses them for a model that does not sample, before any Ray starts (its
    # samples: tests/test_ray_engine.py)
    assert main([*plain, "--samples", "2", "--engine", "ray"]) == 2
    assert "--samples: model 'instcolor' gives one colouring per image" in capsys.readouterr().err
