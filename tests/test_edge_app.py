"""The public edge through the app factory: parameter limits, unknown query parameters, Accept
q-values, image shape limits, own-words errors, outcome accounting, CORS and API-key settings."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import image_corpus as corpus
import pytest
from PIL import Image
from pydantic import ValidationError
from service_helpers import running_app, sample, service_settings

from service.core.api_keys import parse_api_keys
from service.core.metrics import outcome_for
from service.router.auth import AuthPolicy
from service.settings import describe_validation_error

PROBLEM = "application/problem+json"
PNG = {"content-type": "image/png"}


def flat_png(width: int, height: int) -> bytes:
    return corpus.encode(Image.new("L", (width, height), 128), "PNG")


async def test_unknown_query_parameters_get_422_naming_the_declared_ones(
    tiny_checkpoints: Path,
) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (app, client):

        @app.get("/probe-added-later")
        async def probe(saturation: float = 1.0) -> dict[str, float]:
            return {"saturation": saturation}

        response = await client.post("/colorize?qualty=80", content=corpus.png(), headers=PNG)
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM
        detail = response.json()["detail"]
        assert "'qualty'" in detail
        for name in ("boxes", "format", "max_instances", "quality", "resolution"):
            assert name in detail
        ok = await client.post("/colorize?quality=80", content=corpus.png(), headers=PNG)
        assert ok.status_code == 200
        # a parameter added to a route is accepted with no list to update
        assert (await client.get("/probe-added-later?saturation=2")).json() == {"saturation": 2.0}
        added = await client.get("/probe-added-later?bogus=1")
        assert added.status_code == 422
        assert "valid: saturation" in added.json()["detail"]

        @app.get("/page-like", include_in_schema=False)
        async def page() -> dict[str, str]:
            return {"page": "ok"}

        assert (await client.get("/page-like?utm_source=mail")).status_code == 200


BAD_BOXES = {
    "nested 1500 deep": "[" * 1500 + "]" * 1500,
    "a 4000-digit integer": "[[0,0,1" + "0" * 4000 + ",10]]",
    "65 boxes": json.dumps([[0, 0, 10, 10]] * 65),
    "a coordinate of 1e9": "[[0,0,1e9,10]]",
    "NaN": "[[0,0,NaN,10]]",
    "Infinity score": '{"boxes":[[0,0,5,5]],"scores":[Infinity]}',
    "not JSON": "[[0,0,5",
}


@pytest.mark.parametrize("name", BAD_BOXES)
async def test_boxes_beyond_limits_get_422(tiny_checkpoints: Path, name: str) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        response = await client.post(
            "/colorize", params={"boxes": BAD_BOXES[name]}, content=corpus.png(), headers=PNG
        )
        assert response.status_code == 422, (name, response.text)
        assert response.json()["type"].endswith("/invalid-parameter")
        assert "Traceback" not in response.text
        assert len(response.json()["detail"]) < 300  # says what is wrong, does not echo the input


async def test_accept_is_honoured_with_q_values(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):

        async def kind(accept: str) -> str:
            response = await client.post(
                "/colorize", content=corpus.png(), headers={**PNG, "accept": accept}
            )
            assert response.status_code == 200
            return response.headers["content-type"]

        assert await kind("application/json") == "application/json"
        assert await kind("application/json, */*;q=0.5") == "application/json"
        assert await kind("application/json;q=0") == "image/png"
        assert await kind("image/png, application/json;q=0.5") == "image/png"
        assert await kind("application/json;q=0.9, image/*;q=0.8") == "application/json"
        assert await kind("*/*") == "image/png"


async def test_image_shape_limits(tiny_checkpoints: Path) -> None:
    settings = service_settings(tiny_checkpoints, max_pixels=2_000_000, max_aspect_ratio=100)
    async with running_app(settings) as (_, client):
        thin = await client.post("/colorize", content=flat_png(4000, 10), headers=PNG)
        assert thin.status_code == 422
        assert "side ratio over the limit of 100:1" in thin.json()["detail"]
        big = await client.post("/colorize", content=flat_png(2000, 1001), headers=PNG)
        assert big.status_code == 413
        assert big.json()["detail"].startswith("image is 2000x1001 = 2002000 pixels")
        within = await client.post("/colorize", content=flat_png(1000, 10), headers=PNG)
        assert within.status_code == 200
        assert Image.open(io.BytesIO(within.content)).size == (1000, 10)


async def test_library_messages_stay_in_the_log(
    tiny_checkpoints: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.engine.decode")
    data = corpus.png(320, 240)
    truncated_jpeg = corpus.jpeg(320, 240)[:-300]
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        for body, media in ((data[: len(data) // 2], "image/png"), (truncated_jpeg, "image/jpeg")):
            response = await client.post("/colorize", content=body, headers={"content-type": media})
            assert response.status_code == 400
            detail = response.json()["detail"]
            assert detail == (
                "the image data is truncated or corrupt: it holds less data than its header "
                "declares"
            )
            assert "bytes not processed" not in detail  # Pillow's words
    assert "image file is truncated" in caplog.text  # Pillow's own message, in the log only


async def test_unavailable_503_is_counted_as_unavailable(tiny_checkpoints: Path) -> None:
    assert outcome_for(503, "unavailable") == "unavailable"
    assert outcome_for(503, "no-workers") == "unavailable"
    assert outcome_for(503, "overloaded") == "overloaded"
    assert outcome_for(499) == "client_closed"
    async with running_app(service_settings(tiny_checkpoints)) as (app, client):
        before = sample("colorize_requests_total", outcome="unavailable", status="503")
        app.state.service.begin_drain()
        response = await client.post("/colorize", content=corpus.png(), headers=PNG)
        assert response.status_code == 503
        after = sample("colorize_requests_total", outcome="unavailable", status="503")
        assert after == before + 1


async def test_cors_is_off_by_default_and_configurable(tiny_checkpoints: Path) -> None:
    preflight = {
        "origin": "https://photos.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "x-api-key, content-type",
    }
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        response = await client.options("/colorize", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    settings = service_settings(
        tiny_checkpoints,
        cors_origins="https://photos.example",
        api_keys="web:0123456789abcdef0123",
    )
    async with running_app(settings) as (_, client):
        response = await client.options("/colorize", headers=preflight)
        assert response.status_code == 200  # preflights carry no key and are not refused
        assert response.headers["access-control-allow-origin"] == "https://photos.example"
        assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
        other = await client.options("/colorize", headers={**preflight, "origin": "https://x.io"})
        assert "access-control-allow-origin" not in other.headers
        posted = await client.post(
            "/colorize",
            content=corpus.png(),
            headers={
                **PNG,
                "origin": "https://photos.example",
                "x-api-key": "0123456789abcdef0123",
            },
        )
        assert posted.status_code == 200
        assert posted.headers["access-control-allow-origin"] == "https://photos.example"
        assert "x-request-id" in posted.headers["access-control-expose-headers"].lower()


async def test_api_key_file_and_open_routes(tiny_checkpoints: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nmobile:mobile-key-0123456789\nweb:web-key-01234567890\n")
    settings = service_settings(
        tiny_checkpoints, api_key_file=key_file, auth_open_metrics=False, auth_open_probes=False
    )
    async with running_app(settings, ready=False) as (_, client):
        for path in ("/healthz", "/readyz", "/metrics", "/info"):
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Bearer")
        for path in ("/openapi.json", "/docs", "/", "/static/app.js"):
            assert (await client.get(path)).status_code != 401, path  # no data: always open
        headers = {"authorization": "Bearer web-key-01234567890"}
        assert (await client.get("/healthz", headers=headers)).status_code == 200
        info = await client.get("/info", headers={"x-api-key": "mobile-key-0123456789"})
        assert info.json()["api_keys"] is True


async def test_the_key_file_is_read_once_when_the_settings_are_validated(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("web:web-key-01234567890\n")
    settings = service_settings(tiny_checkpoints, api_key_file=key_file)
    assert settings.api_key_table() == {"web": "web-key-01234567890"}
    key_file.write_text("web:a-later-key-0123456789\n")  # the app uses the table, not the file
    async with running_app(settings) as (_, client):
        assert (await client.get("/info")).status_code == 401
        info = await client.get("/info", headers={"x-api-key": "web-key-01234567890"})
        assert info.status_code == 200
        assert info.json()["api_keys"] is True
        later = await client.get("/info", headers={"x-api-key": "a-later-key-0123456789"})
        assert later.status_code == 401


def test_malformed_keys_refuse_the_start_without_showing_a_key(tiny_checkpoints: Path) -> None:
    cases = {
        "justakey-0123456789": "not 'name:key'",
        "short:abc": "shorter than 16 characters",
        "a:0123456789abcdefg,a:0123456789abcdefh": "appears twice",
    }
    for value, reason in cases.items():
        with pytest.raises(ValidationError) as raised:
            service_settings(tiny_checkpoints, api_keys=value)
        message = describe_validation_error(raised.value)
        assert "COLORIZE_API_KEYS" in message
        assert reason in message
        assert "0123456789" not in message and "abc" not in message
    keys = parse_api_keys("a:0123456789abcdefgh, b:0123456789abcdefgi", "test")
    policy = AuthPolicy(keys)
    assert policy.key_name("0123456789abcdefgi") == "b"
    assert policy.key_name("0123456789abcdefgX") is None
    assert policy.key_name("") is None


async def test_truncated_images_get_400_truncated_image_unless_allowed(
    tiny_checkpoints: Path,
) -> None:
    cut = corpus.cut_jpeg_with_eoi()  # libjpeg alone would answer a half-grey picture
    jpeg_type = {"content-type": "image/jpeg"}
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        refused = await client.post("/colorize", content=cut, headers=jpeg_type)
        assert refused.status_code == 400
        assert refused.headers["content-type"] == PROBLEM
        problem = refused.json()
        assert problem["type"] == "https://instcolor.dev/problems/truncated-image"
        assert problem["title"] == "Image data is truncated"
        whole = await client.post("/colorize", content=corpus.png(), headers=PNG)
        assert whole.status_code == 200 and "x-image-truncated" not in whole.headers
    allowed = service_settings(tiny_checkpoints, allow_truncated_images=True)
    async with running_app(allowed) as (_, client):
        image = await client.post("/colorize", content=cut, headers=jpeg_type)
        assert image.status_code == 200
        assert image.headers["x-image-truncated"] == "true"
        assert Image.open(io.BytesIO(image.content)).size == (160, 120)
        answer = await client.post(
            "/colorize",
            content=corpus.png_without_iend(),
            headers={**PNG, "accept": "application/json"},
        )
        assert answer.status_code == 200
        assert answer.headers["x-image-truncated"] == "true"
        assert answer.json()["truncated"] is True
        whole = await client.post(
            "/colorize", content=corpus.png(), headers={**PNG, "accept": "application/json"}
        )
        assert "x-image-truncated" not in whole.headers
        assert whole.json()["truncated"] is False
        webp = await client.post(
            "/colorize", content=corpus.cut_webp(), headers={"content-type": "image/webp"}
        )
        assert webp.status_code == 400  # no best effort for a cut WebP
        assert webp.json()["type"].endswith("/truncated-image")
