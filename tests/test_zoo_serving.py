"""Several registry models in one service: ?model=, GET /models, per-model batching, the
factory and the automatic pipeline (seeded weights in the official layouts, real loaders)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import image_corpus as corpus
import numpy as np
import pytest
import torch
from PIL import Image
from redis_fixtures import redis_prefix, redis_url
from service_helpers import running_app, sample, service_settings

from models.automatic import AutomaticPipeline
from models.boxes import Detections
from models.checkpoints import sha256_file
from models.lab import lab_to_rgb, rgb_to_lab, to_uint8
from models.pipeline import ColorizeOptions, Colorizer, OptionsError
from models.preprocess import to_tensor
from models.registry import MODELS, UnknownModelError, get_model
from models.zoo import load_colorizer

__all__ = ["redis_prefix", "redis_url"]  # fixtures


def test_the_factory_loads_every_model_through_one_interface(zoo_weights: Path) -> None:
    instcolor = load_colorizer("instcolor", zoo_weights)
    assert isinstance(instcolor, Colorizer)
    eccv16 = load_colorizer("zhang-eccv16", zoo_weights)
    assert isinstance(eccv16, AutomaticPipeline)
    (path,) = get_model("zhang-eccv16").weight_paths(zoo_weights)
    assert eccv16.describe()["files"] == [{"name": path.name, "sha256": sha256_file(path)}]
    assert eccv16.version.startswith("zhang-eccv16-")
    with pytest.raises(UnknownModelError, match="known models: instcolor"):
        load_colorizer("nope", zoo_weights)


def test_the_automatic_pipeline_merges_at_the_original_resolution(zoo_weights: Path) -> None:
    """prepare -> predict -> merge equals the model's own predict_ab on L at 256, upsampled and
    joined to the original L, computed here step by step."""
    pipeline = load_colorizer("zhang-eccv16", zoo_weights, channels_last=False)
    model = get_model("zhang-eccv16").load(zoo_weights)
    photo = Image.linear_gradient("L").resize((200, 120)).convert("RGB")
    (result,) = pipeline.colorize([photo])
    assert result.image.size == (200, 120)
    small = photo.resize((256, 256), Image.Resampling.BILINEAR)
    lightness_256 = rgb_to_lab(to_tensor(small))[0:1]
    with torch.inference_mode():
        ab = model.predict_ab(lightness_256[None])[0]
    full = rgb_to_lab(to_tensor(photo))
    ab_up = torch.nn.functional.interpolate(
        ab[None], size=(120, 200), mode="bilinear", align_corners=False, antialias=True
    )[0]
    want = to_uint8(lab_to_rgb(torch.cat((full[0:1], ab_up))).clamp(0, 1))
    got = torch.from_numpy(np.array(result.image)).permute(2, 0, 1)
    assert (got.int() - want.int()).abs().max() <= 1
    # saturation 0 leaves grey; the network resolution is the model's input size
    (grey,) = pipeline.colorize([photo], ColorizeOptions(saturation=0.0, resolution="network"))
    rgb = np.array(grey.image).astype(int)
    assert grey.image.size == (256, 256)
    assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 1


def test_boxes_are_refused_by_a_model_without_the_detector(zoo_weights: Path) -> None:
    pipeline = load_colorizer("zhang-siggraph17", zoo_weights)
    boxes = Detections.from_boxes([[0, 0, 10, 10]])
    with pytest.raises(OptionsError, match="does not use boxes"):
        pipeline.prepare(Image.new("RGB", (32, 32)), ColorizeOptions(boxes=boxes))


def settings_for(weights: Path, models: str, **overrides: object) -> object:
    return service_settings(
        weights / "checkpoints", weights_dir=weights, models=models, **overrides
    )


async def test_model_query_models_route_and_unknown_models(zoo_weights: Path) -> None:
    settings = settings_for(zoo_weights, "instcolor,zhang-eccv16")
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        listed = (await client.get("/models")).json()
        assert listed["default"] == "instcolor"
        by_name = {m["name"]: m for m in listed["models"]}
        assert list(by_name) == ["instcolor", "zhang-eccv16"]
        eccv16 = by_name["zhang-eccv16"]
        (path,) = get_model("zhang-eccv16").weight_paths(zoo_weights)
        assert eccv16["files"] == [{"name": path.name, "sha256": sha256_file(path)}]
        assert eccv16["input_size"] == 256 and eccv16["uses_boxes"] is False
        assert eccv16["loaded"] is True and eccv16["default"] is False
        assert by_name["instcolor"]["uses_boxes"] is True
        assert len(by_name["instcolor"]["files"]) == 3

        image = corpus.png(80, 60)
        headers = {"content-type": "image/png"}
        default = await client.post("/colorize", content=image, headers=headers)
        assert default.status_code == 200
        assert default.headers["x-model"] == "instcolor"
        chosen = await client.post("/colorize?model=zhang-eccv16", content=image, headers=headers)
        assert chosen.status_code == 200, chosen.text
        assert chosen.headers["x-model"] == "zhang-eccv16"
        assert chosen.headers["x-model-version"] == eccv16["model_version"]
        assert 'desc="zhang-eccv16"' in chosen.headers["server-timing"]
        assert Image.open(__import__("io").BytesIO(chosen.content)).size == (80, 60)
        assert chosen.content != default.content
        assert (
            sample(
                "colorize_model_stage_duration_seconds_count", model="zhang-eccv16", stage="total"
            )
            >= 1
        )

        for name in ("zhang-siggraph17", "nope"):  # not loaded here / not a model
            refused = await client.post(f"/colorize?model={name}", content=image, headers=headers)
            assert refused.status_code == 422
            assert refused.headers["content-type"] == "application/problem+json"
            detail = refused.json()["detail"]
            assert name in detail and "instcolor, zhang-eccv16" in detail
        # an empty name is not "the default": the contract lists the names (schemathesis found it)
        empty = await client.post("/colorize?model=", content=image, headers=headers)
        assert empty.status_code == 422, empty.text
        assert "instcolor, zhang-eccv16" in empty.json()["detail"]

        boxed = await client.post(
            "/colorize?model=zhang-eccv16&boxes=[[1,1,20,20]]", content=image, headers=headers
        )
        assert boxed.status_code == 422
        assert "does not use boxes" in boxed.json()["detail"]


async def test_batches_never_mix_models(zoo_weights: Path) -> None:
    settings = settings_for(
        zoo_weights, "instcolor,zhang-eccv16", max_batch_size=8, max_batch_delay_ms=300.0
    )
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        before = {
            m: sample("colorize_model_batch_size_count", model=m)
            for m in ("instcolor", "zhang-eccv16")
        }
        sums = {
            m: sample("colorize_model_batch_size_sum", model=m)
            for m in ("instcolor", "zhang-eccv16")
        }
        image = corpus.png(48, 40)
        headers = {"content-type": "image/png"}
        calls = [
            client.post(f"/colorize?model={m}", content=image, headers=headers)
            for m in ("instcolor", "zhang-eccv16") * 2
        ]
        answers = await asyncio.gather(*calls)
        assert [a.status_code for a in answers] == [200] * 4
        assert [a.headers["x-model"] for a in answers] == ["instcolor", "zhang-eccv16"] * 2
        for m in ("instcolor", "zhang-eccv16"):
            images = sample("colorize_model_batch_size_sum", model=m) - sums[m]
            batches = sample("colorize_model_batch_size_count", model=m) - before[m]
            assert images == 2, m  # each model's engine saw exactly its own two jobs
            assert batches == 1, m  # arriving together, they were batched together


def test_every_registered_model_has_a_name_the_settings_accept() -> None:
    from service.core.jobs import DEFAULT_MODEL
    from service.settings import MODEL_NAME, ModelSettings

    assert next(iter(MODELS)) == DEFAULT_MODEL
    for name in MODELS:
        assert MODEL_NAME.match(name), name
    assert ModelSettings(models=" instcolor , zhang-eccv16").model_list() == [
        "instcolor",
        "zhang-eccv16",
    ]


def test_instcolor_files_default_under_the_weights_dir(tmp_path: Path) -> None:
    from service.settings import ModelSettings

    settings = ModelSettings(weights_dir=tmp_path)
    assert settings.checkpoints == tmp_path / "checkpoints"
    assert settings.detector_weights.parent == tmp_path
    given = ModelSettings(weights_dir=tmp_path, checkpoints=Path("/x"))
    assert given.checkpoints == Path("/x")


async def test_redis_workers_take_only_the_jobs_of_their_models(
    zoo_weights: Path, redis_url: str, redis_prefix: str
) -> None:
    """A real worker (``run_worker``) loading instcolor and zhang-eccv16 answers both through
    their own streams; a model no worker loaded gets 503 no-workers and stays off every stream
    a worker reads."""
    import os
    import signal

    import redis as sync_redis

    from service.commands.worker import run_worker

    common = {
        "queue": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix,
        "worker_metrics_port": 0, "cache_enabled": False, "max_batch_delay_ms": 50.0,
    }  # fmt: skip
    worker_settings = settings_for(zoo_weights, "instcolor,zhang-eccv16", **common)
    api_settings = settings_for(zoo_weights, "instcolor,zhang-eccv16,zhang-siggraph17", **common)
    worker = asyncio.create_task(run_worker(worker_settings))  # type: ignore[arg-type]
    try:
        async with running_app(api_settings, ready=False) as (_, client):  # type: ignore[arg-type]
            image = corpus.png(40, 32)
            headers = {"content-type": "image/png"}
            for _ in range(600):
                if (await client.get("/models")).json()["models"][1]["loaded"]:
                    break
                await asyncio.sleep(0.1)
            listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
            assert listed["zhang-eccv16"]["loaded"] and listed["instcolor"]["loaded"]
            assert not listed["zhang-siggraph17"]["loaded"]
            assert listed["zhang-eccv16"]["uses_boxes"] is False
            for model in ("instcolor", "zhang-eccv16"):
                answer = await client.post(
                    f"/colorize?model={model}", content=image, headers=headers
                )
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-model"] == model
            alone = await client.post(
                "/colorize?model=zhang-siggraph17", content=image, headers=headers
            )
            assert alone.status_code == 503
            assert alone.json()["type"].endswith("no-workers")
        keys = sync_redis.Redis.from_url(redis_url)
        try:
            assert keys.exists(f"{redis_prefix}:jobs") and keys.exists(
                f"{redis_prefix}:jobs:zhang-eccv16"
            )
            groups = keys.xinfo_groups(f"{redis_prefix}:jobs:zhang-eccv16")
            assert groups[0]["lag"] == 0 and groups[0]["pending"] == 0
            assert keys.xlen(f"{redis_prefix}:jobs:zhang-siggraph17") == 0
        finally:
            keys.close()
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: a graceful stop
        assert await asyncio.wait_for(worker, 60) == 0


def test_colorize_command_runs_the_chosen_model(
    zoo_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``colorize --model zhang-siggraph17 --weights-dir DIR`` writes what the pipeline gives;
    an unknown model and boxes for a boxless model are usage errors (exit 2)."""
    from service.cli import main

    photo = Image.linear_gradient("L").resize((90, 60))
    photo.save(tmp_path / "photo.png")
    common = [
        "--no-progress",
        "--no-detector",
        "--precision",
        "fp32",
        "--weights-dir",
        str(zoo_weights),
    ]
    out = tmp_path / "out"
    code = main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model",
                 "zhang-siggraph17", *common])  # fmt: skip
    assert code == 0
    written = Image.open(out / "photo.png")
    assert written.size == (90, 60)
    pipeline = load_colorizer("zhang-siggraph17", zoo_weights, precision="fp32")
    (want,) = pipeline.colorize([photo.convert("RGB")])
    assert np.array_equal(np.array(written.convert("RGB")), np.array(want.image))

    capsys.readouterr()
    assert main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model", "nope",
                 *common]) == 2  # fmt: skip
    assert "known models: instcolor" in capsys.readouterr().err
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"photo.png": {"boxes": [[0, 0, 10, 10]]}}')
    assert main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model",
                 "zhang-eccv16", "--boxes", str(boxes), *common]) == 2  # fmt: skip
    assert "does not use boxes" in capsys.readouterr().err


def test_evaluate_model_and_compare_models(
    zoo_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``evaluate --model`` and ``--compare "zhang=--model zhang-siggraph17"``: one report per
    model on the same photos, each naming its model, and the comparison table across them."""
    import csv
    import json

    from service.cli import main

    monkeypatch.chdir(tmp_path)  # no weights/vgg16 file here: no LPIPS unless asked
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(72, 48), (64, 64)]):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    common = ["--no-progress", "--no-detector", "--precision", "fp32",
              "--weights-dir", str(zoo_weights)]  # fmt: skip
    single = tmp_path / "single"
    assert main(["evaluate", str(photos), "-o", str(single), "--model", "zhang-eccv16",
                 *common]) == 0  # fmt: skip
    summary = json.loads((single / "summary.json").read_text())
    assert summary["config"]["model"] == "zhang-eccv16"
    assert summary["model_version"] == load_colorizer("zhang-eccv16", zoo_weights).version

    report = tmp_path / "report"
    code = main(["evaluate", str(photos), "-o", str(report), "--compare", "inst=",
                 "zhang=--model zhang-siggraph17", "eccv=--model zhang-eccv16", *common])  # fmt: skip
    assert code == 0
    versions = {}
    for name, model in (
        ("inst", "instcolor"),
        ("zhang", "zhang-siggraph17"),
        ("eccv", "zhang-eccv16"),
    ):
        run = json.loads((report / name / "summary.json").read_text())
        assert run["config"]["model"] == model
        versions[name] = run["model_version"]
        with (report / name / "metrics.csv").open(newline="") as handle:
            assert [r["path"] for r in csv.DictReader(handle)] == ["p0.png", "p1.png"]
    assert len(set(versions.values())) == 3
    assert versions["eccv"] == summary["model_version"]
    # the same model and photos give the same scores whether run alone or compared
    with (
        (single / "metrics.csv").open(newline="") as a,
        (report / "eccv" / "metrics.csv").open(newline="") as b,
    ):
        assert [r["psnr"] for r in csv.DictReader(a)] == [r["psnr"] for r in csv.DictReader(b)]
    comparison = json.loads((report / "comparison.json").read_text())
    assert comparison["baseline"] == "inst"
    assert {r["name"] for r in comparison["metrics"]["psnr"]["rows"]} == {"inst", "zhang", "eccv"}

    assert main(["evaluate", str(photos), "-o", str(report), "--compare", "x=--model nope",
                 *common]) == 2  # fmt: skip
