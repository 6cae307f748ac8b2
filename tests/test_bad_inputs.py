"""The bad-input corpus through the HTTP app: each input gets its documented status, the service
stays healthy afterwards, and a good request still succeeds."""

from __future__ import annotations

import io
from pathlib import Path

import image_corpus as corpus
from PIL import Image
from service_helpers import running_app, sample, service_settings, size_of

PROBLEM = "application/problem+json"


async def test_bad_input_corpus_gets_documented_statuses(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        errors_before = sample("colorize_requests_total", outcome="error", status="500")
        wrong: list[str] = []
        for item in corpus.corpus():
            for multipart in (False, True):
                if multipart:
                    response = await client.post(
                        "/colorize", files={"image": (item.name, item.body, item.content_type)}
                    )
                else:
                    response = await client.post(
                        "/colorize", content=item.body, headers={"content-type": item.content_type}
                    )
                label = f"{item.name} ({'multipart' if multipart else 'raw'})"
                if response.status_code != item.status:
                    wrong.append(f"{label}: {response.status_code} {response.text[:200]}")
                    continue
                if item.type_slug is not None:
                    assert response.headers["content-type"] == PROBLEM, label
                    assert response.json()["type"].endswith("/" + item.type_slug), label
                else:
                    assert size_of(response.content) == item.size, label
        assert not wrong, "\n".join(wrong)
        assert sample("colorize_requests_total", outcome="error", status="500") == errors_before
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        good = await client.post(
            "/colorize", content=corpus.jpeg(), headers={"content-type": "image/jpeg"}
        )
        assert good.status_code == 200


async def test_alpha_survives_and_exif_rotation_is_applied(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        rgba = await client.post(
            "/colorize", content=corpus.rgba_png(), headers={"content-type": "image/png"}
        )
        image = Image.open(io.BytesIO(rgba.content))
        assert image.mode == "RGBA"
        source_alpha = Image.open(io.BytesIO(corpus.rgba_png())).getchannel("A")
        assert image.getchannel("A").tobytes() == source_alpha.tobytes()
        as_jpeg = await client.post(
            "/colorize?format=jpeg",
            content=corpus.rgba_png(),
            headers={"content-type": "image/png"},
        )
        assert Image.open(io.BytesIO(as_jpeg.content)).mode == "RGB"  # flattened onto white
        rotated = await client.post(
            "/colorize",
            content=corpus.exif_rotated_jpeg(40, 30),
            headers={"content-type": "image/jpeg"},
        )
        assert size_of(rotated.content) == (30, 40)
