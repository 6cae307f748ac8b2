"""The queue and worker configs are built from the settings: same names, same defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from service.queues.memory import InProcessQueue
from service.queues.redis.client import RedisQueueConfig
from service.queues.redis.protocol import RedisLayout
from service.queues.redis.worker import WorkerConfig
from service.settings import AUTO_BATCH_SIZE, ServiceSettings

SETTINGS = ServiceSettings.model_fields
NOT_SETTINGS = {"layout", "poll_ms", "stats_interval_s", "connect_timeout_s", "require_live_worker"}


@pytest.mark.parametrize("config", [WorkerConfig, RedisQueueConfig])
def test_config_fields_are_settings_with_their_defaults(config: type) -> None:
    for f in dataclasses.fields(config):
        if f.name in NOT_SETTINGS:
            continue
        assert f.name in SETTINGS, f"{config.__name__}.{f.name} renames a setting"
        expected = SETTINGS[f.name].default
        if f.name == "max_batch_size":  # unset in the settings: the automatic size on CUDA
            expected = AUTO_BATCH_SIZE["cuda"]
        assert f.default == expected, f.name


def test_memory_queue_defaults_are_the_settings_defaults() -> None:
    parameters = inspect.signature(InProcessQueue).parameters
    for name in ("max_concurrent_batches", "retry_after_s", "drain_timeout_s"):
        assert parameters[name].default == SETTINGS[name].default
    for name in ("max_batch_size", "max_batch_delay_ms", "queue_size"):
        assert name in SETTINGS
        assert parameters[name].default is inspect.Parameter.empty


def test_from_settings_carries_every_value() -> None:
    settings = ServiceSettings(
        queue="redis", redis_url="redis://db:6380/2", redis_prefix="p", redis_group="g",
        queue_size=99, max_batch_size=3, max_batch_delay_ms=7.0, max_concurrent_batches=3,
        claim_idle_ms=4000, max_deliveries=5, result_ttl_s=30.0, cache_enabled=False,
        cache_ttl_s=60, cache_redis_url="redis://cache:6379/0", retry_after_s=2.0,
        dead_letter_maxlen=50, worker_heartbeat_s=0.5, worker_alive_s=3.0,
    )  # fmt: skip
    for config in (WorkerConfig.from_settings(settings), RedisQueueConfig.from_settings(settings)):
        assert config.layout == RedisLayout("p", "g")
        for f in dataclasses.fields(config):
            if f.name not in NOT_SETTINGS:
                assert getattr(config, f.name) == getattr(settings, f.name), f.name
