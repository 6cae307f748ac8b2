"""The one batch-collection rule (service.core.batching), shared by memory and Redis mode."""

from __future__ import annotations

import pytest

from service.core.batching import fill_wait


def test_a_fresh_batch_waits_the_delay_from_its_oldest_admission() -> None:
    assert fill_wait(oldest_admitted=100.0, delay_s=0.005, now=100.0) == pytest.approx(0.005)
    assert fill_wait(oldest_admitted=100.0, delay_s=0.005, now=100.002) == pytest.approx(0.003)


def test_a_job_that_already_waited_the_delay_is_not_held_again() -> None:
    assert fill_wait(oldest_admitted=100.0, delay_s=0.005, now=100.005) == 0.0
    assert fill_wait(oldest_admitted=100.0, delay_s=0.005, now=160.0) == 0.0


def test_no_delay_means_go_at_once() -> None:
    assert fill_wait(oldest_admitted=100.0, delay_s=0.0, now=100.0) == 0.0
