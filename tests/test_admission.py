"""Deadlines end work, and admission is by estimated cost (memory mode; Redis mode is in
test_redis_edge.py): the engine's timings feed the cost model, an over-cost request is refused at
once with 503 and a Retry-After derived from the backlog, and expired or abandoned jobs never
reach the CPU stages or the device."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import image_corpus as corpus
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from service_helpers import (
    GatedEngine,
    gated_factory,
    make_job,
    running_app,
    sample,
    service_settings,
)

from models.checkpoints import load_networks
from models.pipeline import ColorizeOptions, Colorizer, Prediction, PreparedImage, StopCheck
from service.core.admission import CostModel, refusal
from service.core.errors import DeadlineExceededError
from service.core.jobs import JobResult
from service.core.metrics import Metrics
from service.engine.batch import BatchEngine
from service.queues.memory import InProcessQueue

PNG = {"content-type": "image/png"}


class CountingColorizer(Colorizer):
    """The real colorizer, counting the images that reach prepare (CPU) and predict (device)."""

    def __init__(self, base: Colorizer) -> None:
        self.__dict__.update(base.__dict__)
        self.prepared = 0
        self.predicted = 0

    def prepare(self, image: Any, options: ColorizeOptions | None = None) -> PreparedImage:
        self.prepared += 1
        return super().prepare(image, options)

    def predict(
        self, batch: Sequence[PreparedImage], should_stop: StopCheck | None = None
    ) -> list[Prediction | None]:
        self.predicted += len(batch)
        return super().predict(batch, should_stop)


async def test_expired_and_abandoned_jobs_skip_cpu_and_device(tiny_colorizer: Colorizer) -> None:
    colorizer = CountingColorizer(tiny_colorizer)
    engine = BatchEngine(colorizer, ThreadPoolExecutor(2), max_pixels=10**7)
    try:
        live, expired, gone = (
            make_job(corpus.png(), "live"),
            make_job(corpus.png(), "expired", timeout=-1.0),
            make_job(corpus.png(), "gone"),
        )
        outcomes = await engine.run_batch(
            [live, expired, gone], abandoned=lambda job: job.request_id == "gone"
        )
        assert isinstance(outcomes[0], JobResult)
        assert isinstance(outcomes[1], DeadlineExceededError)
        assert not isinstance(outcomes[2], JobResult)
        assert colorizer.prepared == 1  # only the live job was decoded and prepared
        assert colorizer.predicted == 1  # and only it reached the device
    finally:
        engine.close()


def test_cost_model_learns_from_stage_timings_and_refusal_arithmetic() -> None:
    model = CostModel()
    job = make_job(b"", "a")
    assert not model.measured
    big = dataclasses.replace(job, pixels=2_000_000)
    timings = {"decode": 0.5, "merge": 0.3, "encode": 0.2, "detect": 0.0, "instance": 0.2,
               "fusion": 0.1}  # fmt: skip
    result = JobResult(b"", "image/png", [[0, 0, 1, 1]], [0.9], timings, "v")
    model.observe_batch([(big, result)])
    assert model.measured
    assert abs(model.seconds_per_megapixel - 0.5) < 1e-12  # (0.5 + 0.3 + 0.2) s / 2 MP
    assert abs(model.seconds_per_pass - 0.15) < 1e-12  # 0.3 s / (1 image + 1 instance)
    assert abs(model.estimate(big) - (2 * 0.5 + (1 + 1) * 0.15)) < 1e-9
    assert refusal(backlog_s=2.0, cost_s=1.0, remaining_s=5.0, min_retry_after_s=1.0) is None
    assert refusal(backlog_s=9.0, cost_s=1.0, remaining_s=5.0, min_retry_after_s=1.0) == 5.0
    assert refusal(backlog_s=5.0, cost_s=0.5, remaining_s=5.0, min_retry_after_s=1.0) == 1.0


def flat_png(width: int, height: int) -> bytes:
    return corpus.encode(Image.new("L", (width, height), 100), "PNG")


async def test_over_cost_request_is_refused_at_once_with_retry_after_from_backlog(
    tiny_colorizer: Colorizer, tiny_checkpoints: Path
) -> None:
    settings = service_settings(
        tiny_checkpoints, request_timeout_s=6.0, max_batch_size=1, max_concurrent_batches=1
    )
    holder: dict[str, GatedEngine] = {}
    async with running_app(settings, gated_factory(tiny_colorizer, holder)) as (app, client):
        queue = app.state.service.queue
        assert isinstance(queue, InProcessQueue)
        engine = holder["engine"]
        engine.gate.set()
        image = flat_png(1000, 1000)
        for _ in range(2):  # the engine measures as it runs
            assert (await client.post("/colorize", content=image, headers=PNG)).status_code == 200
        assert queue.cost.measured and queue.cost.seconds_per_megapixel > 0
        # Fix the costs so the arithmetic below is exact: 1 s per megapixel, nothing per pass.
        queue.cost.seconds_per_megapixel, queue.cost.seconds_per_pass = 1.0, 0.0
        engine.gate.clear()  # batches wait: the backlog only grows
        refused_before = sample("colorize_refused_by_cost_total")

        async def post() -> tuple[httpx.Response, float]:
            start = time.perf_counter()
            response = await client.post("/colorize", content=image, headers=PNG)
            return response, time.perf_counter() - start

        held = [asyncio.create_task(post()) for _ in range(5)]  # 5 s of work: all fit in 6 s
        while queue.backlog_seconds() < 4.99:
            await asyncio.sleep(0.01)
        response, seconds = await post()  # 5 s ahead + 1 s own > 6 s - (time already spent)
        assert response.status_code == 503
        assert response.json()["type"].endswith("/overloaded")
        assert "would not finish before its deadline" in response.json()["detail"]
        assert seconds < 1.0  # refused at once, not after the deadline
        assert int(response.headers["retry-after"]) == 1  # 5 + 1 - 6 s, at least 1
        assert sample("colorize_refused_by_cost_total") == refused_before + 1
        more = [asyncio.create_task(post()) for _ in range(3)]  # 3 more: all refused
        for task in more:
            refused, _ = await task
            assert refused.status_code == 503
        # Retry-After grows with the backlog: fake 20 s of queued work
        queue._backlog_s += 15.0
        larger, _ = await post()
        assert int(larger.headers["retry-after"]) in (15, 16)  # 20 + 1 - (6 less time spent)
        queue._backlog_s -= 15.0
        engine.gate.set()
        for task in held:
            done, _ = await task
            assert done.status_code in (200, 504)
        assert queue.backlog_seconds() < 1e-6  # every admitted entry was settled


class StageCounting(CountingColorizer):
    """Also counts merges, and records the batch each network saw (hooks on its own nets)."""

    def __init__(self, base: Colorizer) -> None:
        super().__init__(base)
        self.merged = 0
        self.network_batches: dict[str, list[int]] = {"instance": [], "fusion": [], "full": []}
        for name, net in (("instance", self.instance_net), ("fusion", self.fusion_net),
                          ("full", self.full_image_net)):  # fmt: skip
            net.register_forward_pre_hook(self._recorder(name))

    def _recorder(self, name: str) -> Any:
        def record(module: Any, args: tuple[Any, ...]) -> None:
            self.network_batches[name].append(int(args[0].shape[0]))

        return record

    def merge(self, prepared: PreparedImage, prediction: Prediction, *args: Any) -> Any:
        self.merged += 1
        return super().merge(prepared, prediction, *args)


def own_colorizer(checkpoints: Path) -> StageCounting:
    """Networks of this test's own (hooks are attached to them)."""
    return StageCounting(Colorizer(load_networks(checkpoints), precision="fp32"))


async def test_a_job_expiring_during_predict_skips_the_later_networks_merge_and_encode(
    tiny_checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.engine import batch as batch_module

    colorizer = own_colorizer(tiny_checkpoints)
    encoded: list[str] = []
    real_encode = batch_module.encode_image

    def counting_encode(*args: Any, **kwargs: Any) -> Any:
        encoded.append("encode")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(batch_module, "encode_image", counting_encode)
    metrics = Metrics(CollectorRegistry())
    engine = BatchEngine(colorizer, ThreadPoolExecutor(2), metrics, max_pixels=10**7)
    boxes = [[2, 2, 30, 30], [20, 10, 60, 40]]
    live = make_job(corpus.png(), "live", boxes=boxes)
    expiring = make_job(corpus.png(), "expiring", timeout=60.0, boxes=boxes)

    def expire_during_the_instance_net(module: Any, args: tuple[Any, ...]) -> None:
        object.__setattr__(expiring, "deadline", time.time() - 0.001)  # passes mid-predict

    colorizer.instance_net.register_forward_pre_hook(expire_during_the_instance_net)
    try:
        outcomes = await engine.run_batch([live, expiring])
    finally:
        engine.close()
    assert isinstance(outcomes[0], JobResult)
    assert isinstance(outcomes[1], DeadlineExceededError)
    assert colorizer.prepared == 2 and colorizer.predicted == 2  # both were in the batch
    assert colorizer.network_batches["instance"] == [4]  # both images' crops
    assert colorizer.network_batches["fusion"] == [1]  # only the live image
    assert colorizer.merged == 1 and encoded == ["encode"]  # the expired one never merged
    assert sample_of(metrics, "deadline") == 1  # counted once, however many stages asked


async def test_a_job_expiring_after_its_last_network_is_not_merged(
    tiny_checkpoints: Path,
) -> None:
    colorizer = own_colorizer(tiny_checkpoints)
    metrics = Metrics(CollectorRegistry())
    engine = BatchEngine(colorizer, ThreadPoolExecutor(2), metrics, max_pixels=10**7)
    job = make_job(corpus.png(), "late", timeout=60.0, max_instances=0)

    def expire_in_the_full_image_net(module: Any, args: tuple[Any, ...], output: Any) -> None:
        object.__setattr__(job, "deadline", time.time() - 0.001)

    colorizer.full_image_net.register_forward_hook(expire_in_the_full_image_net)
    try:
        [outcome] = await engine.run_batch([job])
    finally:
        engine.close()
    assert isinstance(outcome, DeadlineExceededError)
    assert colorizer.network_batches["full"] == [1]
    assert colorizer.merged == 0
    assert sample_of(metrics, "deadline") == 1


async def test_a_job_expired_before_predict_runs_no_network(tiny_checkpoints: Path) -> None:
    colorizer = own_colorizer(tiny_checkpoints)
    metrics = Metrics(CollectorRegistry())
    engine = BatchEngine(colorizer, ThreadPoolExecutor(2), metrics, max_pixels=10**7)
    live, doomed = make_job(corpus.png(), "live"), make_job(corpus.png(), "doomed", timeout=60.0)
    real_prepare = colorizer.prepare

    def prepare_then_expire(image: Any, options: ColorizeOptions | None = None) -> Any:
        prepared = real_prepare(image, options)
        object.__setattr__(doomed, "deadline", time.time() - 0.001)
        return prepared

    colorizer.prepare = prepare_then_expire  # type: ignore[method-assign]
    try:
        outcomes = await engine.run_batch([live, doomed])
    finally:
        engine.close()
    # both decoded and prepared; the doomed one is dropped before the device
    assert isinstance(outcomes[0], JobResult)
    assert isinstance(outcomes[1], DeadlineExceededError)
    assert colorizer.network_batches["full"] == [1] and colorizer.merged == 1


def sample_of(metrics: Metrics, reason: str) -> float:
    return metrics.dropped.labels(reason=reason)._value.get()
