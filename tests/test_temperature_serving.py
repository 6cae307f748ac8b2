"""``temperature`` per request: POST /colorize, the OpenAPI, the batch API's options, the Redis
frames and cache key, ``colorize --temperature`` and ``evaluate --temperature``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import image_corpus as corpus
import numpy as np
import pytest
from PIL import Image
from service_helpers import running_app, service_settings

from models.constants import TEMPERATURE_RANGE
from models.pipeline import ColorizeOptions
from models.zoo import load_colorizer

PNG = {"content-type": "image/png"}


def decoded(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), dtype=int)


async def test_colorize_takes_a_temperature_for_the_annealed_mean_models(zoo_weights: Path) -> None:
    """The answer at ?temperature=T is the pipeline's at T; out of range and models without the
    annealed mean get 422 problem+json saying what to fix; the OpenAPI states the bounds."""
    photo = corpus.gray(80, 60, seed=3).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    image = buffer.getvalue()
    pipeline = load_colorizer("zhang-eccv16", zoo_weights, precision="fp32")
    options = ColorizeOptions(resolution="network", temperature=0.38)
    (want,) = pipeline.colorize([photo], options)
    settings = service_settings(
        zoo_weights / "checkpoints", weights_dir=zoo_weights, models="zhang-eccv16,zhang-siggraph17"
    )
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        query = "/colorize?resolution=network&format=png"
        annealed = await client.post(f"{query}&temperature=0.38", content=image, headers=PNG)
        assert annealed.status_code == 200, annealed.text
        plain = await client.post(query, content=image, headers=PNG)
        explicit_one = await client.post(f"{query}&temperature=1", content=image, headers=PNG)
        cases = {
            "temperature=0": "temperature",
            "temperature=1.5": "temperature",
            "temperature=nan": "temperature",
            "temperature=hot": "temperature",
            "model=zhang-siggraph17&temperature=0.5": "does not decode by the annealed mean",
        }
        for case, message in cases.items():
            refused = await client.post(f"{query}&{case}", content=image, headers=PNG)
            assert refused.status_code == 422, (case, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert message in json.dumps(refused.json()), (case, refused.json())
        schema = (await client.get("/openapi.json")).json()
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert listed["zhang-eccv16"]["temperature"] == 1.0  # its default, for the page's field
    assert listed["zhang-siggraph17"]["temperature"] is None  # refuses the option
    got = decoded(annealed.content)
    assert np.abs(got - np.asarray(want.image, dtype=int)).max() <= 1
    # T = 1 is zhang-eccv16's default (the PyTorch release): the same bytes as leaving it out
    assert explicit_one.content == plain.content
    assert np.abs(got - decoded(plain.content)).max() > 1  # the option changes the colours
    (param,) = [
        p for p in schema["paths"]["/colorize"]["post"]["parameters"] if p["name"] == "temperature"
    ]
    (number,) = [s for s in param["schema"]["anyOf"] if s.get("type") == "number"]
    assert (number["minimum"], number["maximum"]) == TEMPERATURE_RANGE
    assert "zhang-eccv16" in param["description"] and "li-dcnn" in param["description"]


def test_temperature_crosses_the_redis_stream_and_is_part_of_the_cache_key() -> None:
    from service.core.jobs import Job, JobOptions
    from service.queues.redis.protocol import cache_digest, job_fields, job_from_fields

    job = Job("r", b"img", JobOptions(temperature=0.38), deadline=2.0, enqueued_at=1.0)
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in job_fields(job, "t").items()
    }
    assert job_from_fields(fields)[1].options.temperature == 0.38
    plain = job_fields(Job("r", b"img", JobOptions(), deadline=2.0, enqueued_at=1.0), "t")
    assert "temperature" not in json.loads(plain["meta"])["options"]  # entries as before
    default_key = cache_digest(b"img", JobOptions(), "v")
    assert cache_digest(b"img", JobOptions(temperature=0.38), "v") != default_key
    assert cache_digest(b"img", JobOptions(temperature=0.5), "v") != cache_digest(
        b"img", JobOptions(temperature=0.38), "v"
    )


def test_batch_options_take_a_temperature() -> None:
    from service.batches.options import check_item_model, check_options, job_options
    from service.core.errors import InvalidParameterError
    from service.settings import ServiceSettings

    settings = ServiceSettings(models="zhang-eccv16,zhang-siggraph17")
    options = check_options({"temperature": 0.38, "model": "zhang-eccv16"}, settings)
    assert job_options(options, settings).temperature == 0.38
    for bad in (0, 1.5, "0.5", True):
        with pytest.raises(InvalidParameterError, match="temperature"):
            check_options({"temperature": bad}, settings)
    # the batch's model and an item's temperature (or the other way round) are checked together
    check_item_model({"model": "zhang-eccv16"}, {"temperature": 0.5}, settings, "item 'a'")
    with pytest.raises(InvalidParameterError, match="item 'a': model 'zhang-siggraph17' does"):
        check_item_model({"temperature": 0.5}, {"model": "zhang-siggraph17"}, settings, "item 'a'")
    with pytest.raises(InvalidParameterError, match="'zhang-siggraph17' does not"):  # the default
        check_item_model(
            {}, {"temperature": 0.5}, ServiceSettings(models="zhang-siggraph17,zhang-eccv16"), "x"
        )


def test_colorize_command_temperature(
    zoo_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    photo = corpus.gray(90, 60, seed=5).convert("RGB")
    photo.save(tmp_path / "photo.png")
    common = ["--no-progress", "--precision", "fp32", "--weights-dir", str(zoo_weights)]
    out = tmp_path / "out"
    code = main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model",
                 "zhang-eccv16", "--temperature", "0.38", *common])  # fmt: skip
    assert code == 0
    pipeline = load_colorizer("zhang-eccv16", zoo_weights, precision="fp32")
    (want,) = pipeline.colorize([photo], ColorizeOptions(temperature=0.38))
    written = np.asarray(Image.open(out / "photo.png").convert("RGB"))
    assert np.array_equal(written, np.asarray(want.image))
    capsys.readouterr()
    code = main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model",
                 "zhang-siggraph17", "--temperature", "0.38", *common])  # fmt: skip
    assert code == 2
    assert "--temperature: model 'zhang-siggraph17' does not decode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["colorize", str(tmp_path / "photo.png"), "--temperature", "2", *common])
    assert "must be between 0.01 and 1" in capsys.readouterr().err


def test_evaluate_command_refuses_a_temperature_for_other_models(
    zoo_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    truth = tmp_path / "truth"
    truth.mkdir()
    corpus.gray(64, 64, seed=6).convert("RGB").save(truth / "a.png")
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "report"), "--weights-dir",
                 str(zoo_weights), "--model", "zhang-siggraph17", "--temperature", "0.38",
                 "--no-progress"])  # fmt: skip
    assert code == 2
    assert "--temperature: model 'zhang-siggraph17' does not decode" in capsys.readouterr().err


def test_evaluate_compares_the_release_and_the_paper_s_temperature(
    zoo_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--compare release='--model zhang-eccv16' paper='... --temperature 0.38'``: each report
    records its temperature (null: the default), and the scores differ."""
    import csv

    from service.cli import main

    monkeypatch.chdir(tmp_path)  # no weights/vgg16 file here: no LPIPS
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    report = tmp_path / "report"
    code = main(["evaluate", str(photos), "-o", str(report), "--no-progress", "--precision",
                 "fp32", "--weights-dir", str(zoo_weights), "--compare",
                 "release=--model zhang-eccv16",
                 "paper=--model zhang-eccv16 --temperature 0.38"])  # fmt: skip
    assert code == 0
    psnr = {}
    for name, temperature in (("release", None), ("paper", 0.38)):
        summary = json.loads((report / name / "summary.json").read_text())
        assert summary["config"]["temperature"] == temperature
        with (report / name / "metrics.csv").open(newline="") as handle:
            psnr[name] = [row["psnr"] for row in csv.DictReader(handle)]
    assert psnr["release"] != psnr["paper"]
