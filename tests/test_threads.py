"""The thread-plan rule (service/engine/threads.py): teams never oversubscribe the cores."""

from __future__ import annotations

import pytest

from service.engine.threads import ThreadPlan, thread_plan, usable_cores


@pytest.mark.parametrize(
    ("cores", "workers", "device", "expected"),
    [
        (16, 4, "cuda", ThreadPlan(4, 3)),  # 1 core for kernel launches, 15 shared by 4
        (16, 4, "cpu", ThreadPlan(4, 3)),  # networks + 4 pool threads: 5 teams of 3
        (16, 1, "cpu", ThreadPlan(1, 8)),
        (2, 4, "cpu", ThreadPlan(2, 1)),  # the pool is never larger than the cores
        (2, 4, "cuda", ThreadPlan(2, 1)),
        (1, 1, "cuda", ThreadPlan(1, 1)),
        (64, 8, "cuda", ThreadPlan(8, 7)),
    ],
    ids=lambda value: str(value).replace("cuda", "gpu"),
)
def test_thread_plan(cores: int, workers: int, device: str, expected: ThreadPlan) -> None:
    assert thread_plan(cores, workers, device) == expected


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["host-networks", "gpu-networks"])
def test_teams_fit_the_cores(device: str) -> None:
    for cores in range(1, 65):
        for workers in range(1, 33):
            plan = thread_plan(cores, workers, device)
            assert 1 <= plan.pool <= cores and plan.intra_op >= 1
            busy = plan.pool if device == "cuda" else plan.pool + 1
            reserved = 1 if device == "cuda" else 0
            if busy + reserved <= cores:  # room for one thread each: teams fit in the cores
                assert busy * plan.intra_op + reserved <= cores


def test_usable_cores_is_positive() -> None:
    assert usable_cores() >= 1
