"""The HTTP app through its factory: every route, every error status, batching, drain, metrics.

Apps run with the tiny random-weight checkpoints and no detector (supplied boxes exercise the
instance and fusion networks); one test runs the random-weight Mask R-CNN.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import image_corpus as corpus
import pytest
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError
from service_helpers import (
    FaultyColorizer,
    GatedEngine,
    batches_over_one,
    engine_factory,
    gated_factory,
    running_app,
    sample,
    service_settings,
    size_of,
    wait_ready,
)

from models.pipeline import Colorizer
from service.app import create_app, default_queue_factory
from service.core.offload import OFFLOAD_BYTES
from service.router.responses import BASE64_PIECE, json_pieces
from service.settings import DEFAULT_DETECTOR_FILENAME, ServiceSettings, describe_validation_error

PROBLEM = "application/problem+json"
STAGES = ("decode", "queue", "detect", "instance", "fusion", "merge", "encode", "total")


async def chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def flat_png(width: int, height: int) -> bytes:
    """A PNG of one grey level: a few hundred bytes whatever its size."""
    return corpus.encode(Image.new("L", (width, height), 128), "PNG")


def problem_type(response: httpx.Response) -> str:
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == response.status_code
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return str(body["type"]).rsplit("/", 1)[-1]


async def test_operational_routes(tiny_checkpoints: Path) -> None:
    settings = service_settings(tiny_checkpoints, warmup=True, max_batch_size=2)
    async with running_app(settings) as (_, client):
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        assert (await client.get("/readyz")).json()["status"] == "ready"
        info = (await client.get("/info")).json()
        assert info["model"]["device"] == "cpu"
        assert info["model"]["precision"] == "fp32"
        assert info["model"]["detector"] is None
        assert {f["name"] for f in info["model"]["files"]} == {
            "latest_net_G.pth", "latest_net_GF.pth", "latest_net_GComp.pth",
        }  # fmt: skip
        assert all(len(f["sha256"]) == 64 for f in info["model"]["files"])
        assert str(tiny_checkpoints) not in json.dumps(info)  # names, never filesystem paths
        assert info["batching"]["max_batch_size"] == 2
        assert info["batching"]["batch_buckets"] == [1, 2]
        assert info["service_version"]
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "colorize_model_info{" in metrics.text
        schema = (await client.get("/openapi.json")).json()
        responses = schema["paths"]["/colorize"]["post"]["responses"]
        for status in ("400", "413", "415", "422", "429", "500", "503", "504"):
            assert PROBLEM in responses[status]["content"], status
        assert {"image/jpeg", "image/png", "image/webp", "application/json"} <= set(
            responses["200"]["content"]
        )
        body = schema["paths"]["/colorize"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "image/*"} <= set(body)
        assert (await client.get("/docs")).status_code == 200
        missing = await client.get("/nope")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == PROBLEM


async def test_readyz_is_503_until_loaded(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    holder: dict[str, GatedEngine] = {}
    loaded = asyncio.Event()
    factory = gated_factory(tiny_colorizer, holder, loaded)
    async with running_app(service_settings(tiny_checkpoints), factory, ready=False) as (_, client):
        loading = await client.get("/readyz")
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        assert (await client.get("/healthz")).status_code == 200
        early = await client.post(
            "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
        )
        assert early.status_code == 503
        assert problem_type(early) == "unavailable"
        assert "retry-after" in early.headers
        loaded.set()
        await wait_ready(client)
        holder["engine"].gate.set()


async def test_colorize_multipart_and_raw_body(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        jpeg = corpus.jpeg(80, 60)
        response = await client.post(
            "/colorize",
            files={"image": ("photo.jpg", jpeg, "image/jpeg")},
            headers={"X-Request-ID": "my-id-1"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["x-request-id"] == "my-id-1"
        assert response.headers["x-instances"] == "0"
        timing = response.headers["server-timing"]
        for stage in STAGES:
            assert f"{stage};dur=" in timing
        assert size_of(response.content) == (80, 60)

        raw = await client.post(
            "/colorize", content=corpus.png(50, 40), headers={"content-type": "image/png"}
        )
        assert raw.status_code == 200
        assert raw.headers["content-type"] == "image/png"
        assert len(raw.headers["x-request-id"]) == 32  # generated
        assert size_of(raw.content) == (50, 40)

        webp = await client.post(
            "/colorize?format=webp&quality=70&resolution=network",
            content=jpeg,
            headers={"content-type": "application/octet-stream"},
        )
        assert webp.status_code == 200
        assert webp.headers["content-type"] == "image/webp"
        assert size_of(webp.content) == (256, 256)


async def test_json_answer_with_supplied_boxes(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        boxes = [[5, 5, 40, 30], [20, 10, 60, 45]]
        response = await client.post(
            "/colorize",
            params={"boxes": json.dumps(boxes), "format": "png"},
            content=corpus.png(64, 48),
            headers={"content-type": "image/png", "accept": "application/json"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["instances"] == 2
        assert body["boxes"] == boxes
        assert body["media_type"] == "image/png"
        assert body["request_id"] == response.headers["x-request-id"]
        assert set(body["timings_ms"]) >= set(STAGES)
        assert body["model_version"].startswith("instcolor-")
        assert size_of(base64.b64decode(body["image_base64"])) == (64, 48)
        scored = await client.post(
            "/colorize",
            params={
                "boxes": json.dumps({"boxes": boxes, "scores": [0.2, 0.9]}),
                "max_instances": 1,
            },
            content=corpus.png(64, 48),
            headers={"content-type": "image/png", "accept": "application/json"},
        )
        assert scored.json()["boxes"] == [boxes[1]]  # the higher score wins the one slot


async def test_a_large_json_answer_carries_the_same_image(tiny_checkpoints: Path) -> None:
    """Over OFFLOAD_BYTES the JSON is encoded on a worker thread: the same bytes as the image."""
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        photo, png = corpus.png(480, 360, seed=3), {"content-type": "image/png"}
        image = await client.post("/colorize", content=photo, headers=png)
        assert image.status_code == 200
        assert len(image.content) > OFFLOAD_BYTES  # the threaded path
        answer = await client.post(
            "/colorize", content=photo, headers={**png, "accept": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert base64.b64decode(body["image_base64"]) == image.content
        assert body["request_id"] == answer.headers["x-request-id"]
        assert answer.headers["x-instances"] == "0"


@pytest.mark.parametrize("size", [0, 1, BASE64_PIECE, 3 * BASE64_PIECE + 2])
def test_json_pieces_join_to_the_json_response(size: int) -> None:
    image = bytes(range(256)) * (size // 256) + bytes(size % 256)
    answer = {"request_id": 'a"image_base64":""', "image_base64": "", "boxes": [[1, 2, 3, 4]]}
    pieces = json_pieces(answer, image)
    expected = {**answer, "image_base64": base64.b64encode(image).decode()}
    assert b"".join(pieces) == JSONResponse(expected).body
    assert max(len(piece) for piece in pieces) <= 4 * BASE64_PIECE // 3 + 64


@pytest.mark.parametrize(
    ("query", "body", "content_type", "status", "kind"),
    [
        ("", b"hello", "text/plain", 415, "unsupported-media-type"),
        ("", b"", "image/png", 400, "invalid-image"),
        ("", b"\x89PNG\r\n\x1a\ngarbage", "image/png", 400, "invalid-image"),
        ("?quality=0", None, "image/png", 422, "invalid-parameter"),
        ("?max_instances=99", None, "image/png", 422, "invalid-parameter"),
        ("?format=gif", None, "image/png", 422, "invalid-parameter"),
        ("?resolution=huge", None, "image/png", 422, "invalid-parameter"),
        ("?score_threshold=2", None, "image/png", 422, "invalid-parameter"),
        ("?boxes=nope", None, "image/png", 422, "invalid-parameter"),
        ("?boxes=[[1,2,3]]", None, "image/png", 422, "invalid-parameter"),
        ("?boxes=[[10,10,5,5]]", None, "image/png", 422, "invalid-parameter"),
    ],
)
async def test_error_statuses(
    tiny_checkpoints: Path,
    query: str,
    body: bytes | None,
    content_type: str,
    status: int,
    kind: str,
) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        before = sample("colorize_requests_total", outcome="client_error", status=str(status))
        response = await client.post(
            "/colorize" + query,
            content=corpus.png() if body is None else body,
            headers={"content-type": content_type},
        )
        assert response.status_code == status, response.text
        assert problem_type(response) == kind
        after = sample("colorize_requests_total", outcome="client_error", status=str(status))
        assert after == before + 1
        assert (
            await client.post(
                "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
            )
        ).status_code == 200


async def test_multipart_without_image_field(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        response = await client.post(
            "/colorize", files={"photo": ("a.png", corpus.png(), "image/png")}
        )
        assert response.status_code == 422
        assert "'image'" in response.json()["detail"]
        wrong = await client.post("/colorize", files={"image": ("a.txt", b"hello", "text/plain")})
        assert wrong.status_code == 415


async def test_size_limits(tiny_checkpoints: Path) -> None:
    settings = service_settings(tiny_checkpoints, max_body_bytes=4096, max_pixels=10_000)
    async with running_app(settings) as (_, client):
        body = await client.post(
            "/colorize", content=b"\xff" * 5000, headers={"content-type": "image/jpeg"}
        )
        assert body.status_code == 413
        assert problem_type(body) == "payload-too-large"
        chunked = await client.post(  # no Content-Length: refused while streaming
            "/colorize",
            content=chunks([b"\xff" * 3000, b"\xff" * 3000]),
            headers={"content-type": "image/jpeg"},
        )
        assert chunked.status_code == 413
        pixels = await client.post(
            "/colorize", content=flat_png(101, 100), headers={"content-type": "image/png"}
        )
        assert pixels.status_code == 413
        assert problem_type(pixels) == "image-too-large"
        ok = await client.post(
            "/colorize", content=flat_png(100, 100), headers={"content-type": "image/png"}
        )
        assert ok.status_code == 200


async def test_concurrent_requests_are_batched_and_matched(tiny_checkpoints: Path) -> None:
    settings = service_settings(tiny_checkpoints, max_batch_size=8, max_batch_delay_ms=100.0)
    async with running_app(settings) as (_, client):
        before = batches_over_one()

        async def one(i: int) -> tuple[int, httpx.Response]:
            width, height = 30 + 7 * i, 20 + 3 * i
            boxes = [[1, 1, width // 2, height // 2]] * (i % 3)
            response = await client.post(
                "/colorize",
                params={"boxes": json.dumps(boxes)} if boxes else {},
                content=corpus.png(width, height, seed=i),
                headers={"content-type": "image/png", "x-request-id": f"req-{i}"},
            )
            return i, response

        results = await asyncio.gather(*(one(i) for i in range(12)))
        for i, response in results:
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] == f"req-{i}"
            assert size_of(response.content) == (30 + 7 * i, 20 + 3 * i)
            assert response.headers["x-instances"] == str(i % 3)
        assert batches_over_one() > before


@pytest.mark.parametrize("overload_status", [503, 429])
async def test_full_queue_answers_at_once_with_retry_after(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path, overload_status: int
) -> None:
    holder: dict[str, GatedEngine] = {}
    settings = service_settings(
        tiny_checkpoints, max_batch_size=1, queue_size=1, max_concurrent_batches=1,
        overload_status=overload_status, retry_after_s=3.0,
    )  # fmt: skip
    async with running_app(settings, gated_factory(tiny_colorizer, holder)) as (_, client):

        def post() -> Any:
            return client.post(
                "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
            )

        first = asyncio.create_task(post())
        await asyncio.sleep(0.2)  # on the gated engine
        second = asyncio.create_task(post())
        await asyncio.sleep(0.2)  # waiting: the queue is full
        start = time.monotonic()
        refused = await post()
        assert time.monotonic() - start < 2.0
        assert refused.status_code == overload_status
        assert problem_type(refused) == "overloaded"
        assert int(refused.headers["retry-after"]) >= 3
        holder["engine"].gate.set()
        assert (await first).status_code == 200
        assert (await second).status_code == 200


async def test_deadline_gives_504_and_service_recovers(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    holder: dict[str, GatedEngine] = {}
    settings = service_settings(
        tiny_checkpoints,
        max_batch_size=1,
        request_timeout_s=0.5,
        max_concurrent_batches=1,
    )
    async with running_app(settings, gated_factory(tiny_colorizer, holder)) as (app, client):

        def post() -> Any:
            return client.post(
                "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
            )

        before = sample("colorize_dropped_requests_total", reason="deadline")
        first, second = await asyncio.gather(post(), post())
        assert first.status_code == 504
        assert problem_type(first) == "deadline-exceeded"
        assert second.status_code == 504
        assert (
            sample("colorize_dropped_requests_total", reason="deadline") == before + 1
        )  # never ran
        assert app.state.service.queue.depth() == 0
        holder["engine"].gate.set()
        assert (await post()).status_code == 200


async def test_internal_error_is_500_with_request_id(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    faulty = FaultyColorizer(tiny_colorizer, poison_size=(33, 33))
    settings = service_settings(tiny_checkpoints, max_batch_delay_ms=200.0)
    async with running_app(settings, engine_factory(faulty)) as (_, client):
        bad, good = await asyncio.gather(
            client.post(
                "/colorize", content=corpus.png(33, 33), headers={"content-type": "image/png"}
            ),
            client.post(
                "/colorize", content=corpus.png(34, 33), headers={"content-type": "image/png"}
            ),
        )
        assert bad.status_code == 500
        assert problem_type(bad) == "internal"
        assert "kernel failure" not in bad.text  # no internals leak
        assert good.status_code == 200
        assert faulty.calls[0] == 2  # they were batched together, and only the bad one failed


class BuggyQueue:
    """The real memory queue whose ``submit`` has a bug: an exception that is no ServiceError."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.queue = default_queue_factory(settings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    async def submit(self, job: Any) -> Any:
        raise RuntimeError("queue bug (injected)")


async def test_unexpected_exception_is_the_500_problem_with_request_id_and_counted(
    tiny_checkpoints: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(service_settings(tiny_checkpoints), BuggyQueue) as (_, client):
        before = sample("colorize_requests_total", outcome="error", status="500")
        by_key = sample("colorize_requests_by_key_total", key="anonymous", outcome="error")
        response = await client.post(
            "/colorize",
            content=corpus.png(20, 20),
            headers={"content-type": "image/png", "x-request-id": "bug-1"},
        )
        assert response.status_code == 500
        assert problem_type(response) == "internal"
        assert response.headers["x-request-id"] == "bug-1"
        assert response.json()["detail"] == (
            "internal error; quote the request ID when reporting it"
        )
        assert "queue bug" not in response.text  # no internals leak
        assert sample("colorize_requests_total", outcome="error", status="500") == before + 1
        assert (
            sample("colorize_requests_by_key_total", key="anonymous", outcome="error") == by_key + 1
        )
        assert sample("colorize_in_flight_requests") == 0
        assert any("bug-1" in r.getMessage() and r.exc_info for r in caplog.records)
        assert (await client.get("/healthz")).status_code == 200  # the app carries on


async def test_client_disconnect_frees_its_slot(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    holder: dict[str, GatedEngine] = {}
    settings = service_settings(tiny_checkpoints, max_batch_size=1, max_concurrent_batches=1)
    async with running_app(settings, gated_factory(tiny_colorizer, holder)) as (app, client):
        first = asyncio.create_task(
            client.post("/colorize", content=corpus.png(), headers={"content-type": "image/png"})
        )
        await asyncio.sleep(0.2)
        queue = app.state.service.queue
        before = sample("colorize_dropped_requests_total", reason="disconnected")
        body = corpus.png()
        leave = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/colorize", "raw_path": b"/colorize", "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"image/png"),
                                         (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1234), "server": ("test", 80),
        }  # fmt: skip
        gone = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.2)
        assert queue.depth() == 1
        leave.set()
        await asyncio.wait_for(gone, 5)
        assert queue.depth() == 0
        assert sample("colorize_dropped_requests_total", reason="disconnected") == before + 1
        holder["engine"].gate.set()
        assert (await first).status_code == 200
        assert holder["engine"].batches == [1]  # the departed request never reached the engine


async def test_graceful_drain_loses_nothing(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    holder: dict[str, GatedEngine] = {}
    settings = service_settings(tiny_checkpoints, max_batch_size=2)
    app = create_app(settings, gated_factory(tiny_colorizer, holder))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
        await wait_ready(client)
        sizes = [(30 + i, 30) for i in range(6)]
        tasks = [
            asyncio.create_task(
                client.post(
                    "/colorize", content=corpus.png(w, h), headers={"content-type": "image/png"}
                )
            )
            for w, h in sizes
        ]
        await asyncio.sleep(0.3)
        app.state.service.begin_drain()  # what SIGTERM does first
        assert (await client.get("/readyz")).json()["status"] == "draining"
        refused = await client.post(
            "/colorize", content=corpus.png(), headers={"content-type": "image/png"}
        )
        assert refused.status_code == 503
        assert "retry-after" in refused.headers
        shutdown = asyncio.create_task(lifespan.__aexit__(None, None, None))  # drains the queue
        await asyncio.sleep(0.2)
        assert not shutdown.done()  # waiting for the queued and in-flight requests
        holder["engine"].gate.set()
        await asyncio.wait_for(shutdown, 30)
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 6
        assert [size_of(r.content) for r in responses] == sizes


async def test_metrics_has_every_name_after_traffic(tiny_checkpoints: Path) -> None:
    async with running_app(service_settings(tiny_checkpoints)) as (_, client):
        await client.post(
            "/colorize?boxes=[[1,1,20,20]]",
            content=corpus.png(),
            headers={"content-type": "image/png"},
        )
        await client.post("/colorize", content=b"x", headers={"content-type": "text/plain"})
        text = (await client.get("/metrics")).text
    names = [
        "colorize_stage_duration_seconds_bucket", "colorize_batch_size_bucket",
        "colorize_instances_per_image_bucket", "colorize_queue_depth",
        "colorize_in_flight_requests", "colorize_requests_total", "colorize_dropped_requests_total",
        "colorize_model_info", "colorize_gpu_memory_allocated_bytes",
        "colorize_cache_requests_total",
        "http_requests_total", "http_request_duration_seconds",
    ]  # fmt: skip
    for name in names:
        assert f"\n{name}" in text, name
    # labelled by model and set from a Redis stream's state: declared here, no sample in memory mode
    for name in ("colorize_redis_pending_jobs", "colorize_redis_stream_length",
                 "colorize_redis_consumers"):  # fmt: skip
        assert f"\n# TYPE {name} gauge\n" in text, name
        assert f"\n{name}{{" not in text, name
    assert 'colorize_queue_depth{model="instcolor"}' in text
    for stage in STAGES:
        assert sample("colorize_stage_duration_seconds_count", stage=stage) > 0, stage
    assert 'http_requests_total{handler="/colorize",method="POST",status="200"}' in text
    assert 'le="0.001"' in text
    assert 'le="10.0"' in text


async def test_detector_finds_boxes(detector_weights: Path, tiny_checkpoints: Path) -> None:
    settings = service_settings(
        tiny_checkpoints, detector=True, detector_weights=detector_weights, max_batch_size=2
    )
    async with running_app(settings) as (_, client):
        info = (await client.get("/info")).json()
        assert info["model"]["detector"] == "maskrcnn_resnet50_fpn_v1"
        assert len(info["model"]["detector_file"]["sha256"]) == 64
        response = await client.post(
            "/colorize?score_threshold=0&max_instances=3",
            content=corpus.jpeg(120, 90),
            headers={"content-type": "image/jpeg", "accept": "application/json"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert 0 <= body["instances"] <= 3
        assert body["timings_ms"]["detect"] > 0


def test_app_module_does_not_import_torch() -> None:
    code = "import sys, service.app, service.settings; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_settings_refuse_bad_values_with_a_fix() -> None:
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(max_batch_size=16, queue_size=8)
    assert "raise COLORIZE_QUEUE_SIZE" in describe_validation_error(caught.value)
    with pytest.raises(ValidationError) as caught:
        ServiceSettings(port=0)
    message = describe_validation_error(caught.value)
    assert "COLORIZE_PORT=0" in message
    assert "TCP port" in message
    assert ServiceSettings(max_batch_size=6, queue_size=8).batch_buckets() == [1, 2, 4, 6]


def test_detector_default_file_name_matches_models() -> None:
    from models.detector import DETECTOR_WEIGHTS

    assert DETECTOR_WEIGHTS["v1"].filename == DEFAULT_DETECTOR_FILENAME


def test_torch_free_detector_file_names_match_torchvision() -> None:
    from models.constants import DETECTOR_FILENAMES
    from models.detector import DETECTOR_WEIGHTS

    assert {v: w.filename for v, w in DETECTOR_WEIGHTS.items()} == DETECTOR_FILENAMES
