"""Colour strength (``saturation``): the pure ab scaling, the pipeline option, the API parameter,
the CLI flag, and its place in the Redis job serialisation and result-cache key."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import httpx
import image_corpus as corpus
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from service_helpers import make_job, running_app, service_settings
from test_cli_colorize import colorize, gray
from test_redis_e2e import Fleet, fleet, redis_prefix, redis_url

from models.merge import SATURATION_RANGE, scale_saturation
from models.pipeline import ColorizeOptions, Colorizer, OptionsError
from service.core.jobs import SATURATION_RANGE as SERVICE_SATURATION_RANGE
from service.core.jobs import JobOptions
from service.queues.redis.protocol import cache_digest, job_fields, job_from_fields

__all__ = ["fleet", "redis_prefix", "redis_url"]  # fixtures

PROBLEM = "application/problem+json"


def chroma_hue(ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.hypot(ab[0], ab[1]), torch.atan2(ab[1], ab[0])


def channel_spread(image: Image.Image) -> int:
    """Largest difference between the R, G and B of any pixel (0 for a gray image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((rgb.max(axis=2) - rgb.min(axis=2)).max())


def colourfulness(image: Image.Image) -> float:
    """Mean difference between the largest and smallest of R, G, B (0 for a gray image)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


# -- the pure function --------------------------------------------------------------------------


def test_one_returns_the_prediction_itself() -> None:
    ab = torch.randn(2, 16, 16)
    assert scale_saturation(ab, 1.0) is ab


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=0.01, max_value=2.0), st.integers(0, 2**16))
def test_scales_chroma_and_keeps_hue(saturation: float, seed: int) -> None:
    ab = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.3
    scaled = scale_saturation(ab, saturation)
    chroma, hue = chroma_hue(ab)
    new_chroma, new_hue = chroma_hue(scaled)
    torch.testing.assert_close(new_chroma, chroma * saturation)
    keep = chroma > 1e-3  # the hue of a near-zero ab is undefined
    angle = torch.remainder(new_hue - hue + math.pi, 2 * math.pi) - math.pi
    assert float(angle[keep].abs().max()) < 1e-4


def test_zero_removes_all_colour() -> None:
    assert torch.count_nonzero(scale_saturation(torch.randn(2, 4, 4), 0.0)) == 0


@pytest.mark.parametrize("bad", [-0.1, 2.01, float("nan"), float("inf")])
def test_out_of_range_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"saturation must be between 0\.0 and 2\.0"):
        scale_saturation(torch.zeros(2, 2, 2), bad)


def test_service_range_matches_the_model() -> None:
    assert SERVICE_SATURATION_RANGE == SATURATION_RANGE


# -- the pipeline -------------------------------------------------------------------------------


def test_pipeline_default_is_unchanged_and_zero_is_gray(
    tiny_colorizer: Colorizer, gray_photo: Image.Image
) -> None:
    plain, same, none, strong = tiny_colorizer.colorize(
        [gray_photo] * 4,
        [
            ColorizeOptions(),
            ColorizeOptions(saturation=1.0),
            ColorizeOptions(saturation=0.0),
            ColorizeOptions(saturation=2.0),
        ],
    )
    assert plain.image.tobytes() == same.image.tobytes()
    assert channel_spread(none.image) <= 1  # L only: gray up to rounding
    assert colourfulness(strong.image) > colourfulness(plain.image) > 0
    with pytest.raises(OptionsError, match=r"saturation must be between 0\.0 and 2\.0, got 2\.5"):
        tiny_colorizer.prepare(gray_photo, ColorizeOptions(saturation=2.5))


# -- the API ------------------------------------------------------------------------------------


async def test_api_saturation_parameter(tiny_checkpoints: Path) -> None:
    image = corpus.jpeg(96, 64)
    headers = {"content-type": "image/jpeg", "accept": "application/json"}
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        answers = {}
        for value in ("1.0", "0", "2"):
            response = await client.post(
                f"/colorize?saturation={value}&format=png", content=image, headers=headers
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["saturation"] == float(value)
            assert body["input_size"] == [96, 64]
            answers[value] = Image.open(io.BytesIO(base64.b64decode(body["image_base64"])))
        default = await client.post("/colorize?format=png", content=image, headers=headers)
        assert base64.b64decode(default.json()["image_base64"]) == _png(answers["1.0"])
        assert channel_spread(answers["0"]) <= 1
        assert colourfulness(answers["2"]) > colourfulness(answers["1.0"])

        for bad in ("2.5", "-1", "nan", "inf", "strong"):
            response = await client.post(
                f"/colorize?saturation={bad}", content=image, headers=headers
            )
            assert response.status_code == 422, bad
            assert response.headers["content-type"] == PROBLEM
            assert "saturation" in response.json()["detail"]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def test_openapi_documents_saturation(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints), ready=False) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    parameters = {p["name"]: p for p in schema["paths"]["/colorize"]["post"]["parameters"]}
    saturation = parameters["saturation"]["schema"]
    assert (saturation["minimum"], saturation["maximum"], saturation["default"]) == (0, 2, 1.0)


# -- Redis serialisation and cache key ----------------------------------------------------------


def test_redis_job_round_trip_keeps_saturation() -> None:
    job = make_job(b"img", saturation=0.4, boxes=[[1.0, 2.0, 3.0, 4.0]])
    fields = job_fields(job, "tok")
    assert json.loads(fields["meta"])["options"]["saturation"] == 0.4
    token, back = job_from_fields({k.encode(): v if isinstance(v, bytes) else v.encode()
                                   for k, v in fields.items()})  # fmt: skip
    assert token == "tok"
    assert back.options == job.options


def test_cache_key_depends_on_saturation() -> None:
    keys = {cache_digest(b"img", JobOptions(saturation=s), "v1") for s in (0.5, 1.0, 1.5)}
    assert len(keys) == 3
    assert cache_digest(b"img", JobOptions(), "v1") == cache_digest(
        b"img", JobOptions(saturation=1.0), "v1"
    )


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_saturation(tmp_path: Path, tiny_checkpoints: Path) -> None:
    gray(80, 60).save(tmp_path / "a.png")
    for value in ("0", "1", "2"):
        code = colorize(tmp_path / "a.png", "-o", tmp_path / value, "--saturation", value,
                        checkpoints=tiny_checkpoints)  # fmt: skip
        assert code == 0
    zero, one, two = (Image.open(tmp_path / v / "a.png") for v in ("0", "1", "2"))
    assert channel_spread(zero) <= 1
    assert colourfulness(two) > colourfulness(one)
    default = tmp_path / "default"
    assert colorize(tmp_path / "a.png", "-o", default, checkpoints=tiny_checkpoints) == 0
    assert Image.open(default / "a.png").tobytes() == one.tobytes()


@pytest.mark.parametrize("bad", ["2.5", "-0.5", "nan", "much"])
def test_cli_refuses_bad_saturation(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    gray(30, 30).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as caught:
        colorize(tmp_path / "a.png", "-o", tmp_path / "out", "--saturation", bad,
                 checkpoints=tiny_checkpoints)  # fmt: skip
    assert caught.value.code == 2
    assert "--saturation" in capsys.readouterr().err


# -- Redis mode end to end ----------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_redis_worker_applies_saturation_and_caches_per_value(fleet: Fleet) -> None:
    """The value travels with the job to a real worker process and is part of the cache key."""
    api, worker = fleet.api(), fleet.worker("w1")
    fleet.wait_ready(api, worker)
    image = corpus.jpeg(80, 60)

    def post(saturation: str) -> httpx.Response:
        return httpx.post(
            f"{api.url}/colorize?saturation={saturation}&format=png", content=image,
            headers={"content-type": "image/jpeg"}, timeout=60,
        )  # fmt: skip

    gray_answer, model_answer, again = post("0"), post("1"), post("0")
    assert [r.status_code for r in (gray_answer, model_answer, again)] == [200, 200, 200]
    assert channel_spread(Image.open(io.BytesIO(gray_answer.content))) <= 1
    assert colourfulness(Image.open(io.BytesIO(model_answer.content))) > 0
    assert "x-cache" not in gray_answer.headers
    assert "x-cache" not in model_answer.headers  # another saturation: not the cached result
    assert again.headers["x-cache"] == "hit"
    assert again.content == gray_answer.content
