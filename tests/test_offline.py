"""The offline batch runner (``models.offline``) and the atomic writes (``models.atomic``).

The runner is driven by a hand-written colorizer whose ``predict`` fails on chosen inputs, so the
read-ahead, the per-image retry and the failure list are checked without weights. The pipeline's
overlap and bounds are observed with events (who waits for whom), never with timings; the
``timeout=`` on each wait only keeps a broken runner from hanging the suite.
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from models.atomic import atomic_path, write_atomic, write_text_atomic
from models.offline import (
    SEQUENTIAL_PLAN,
    PipelinePlan,
    describe_failure,
    pipeline_plan,
    run_batches,
)

REPO = Path(__file__).resolve().parents[1]


class Prepared:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeColorizer:
    """``predict`` returns each image's name; a batch holding a name in ``bad`` fails whole."""

    def __init__(self, bad: Sequence[str] = ()) -> None:
        self.bad = set(bad)
        self.calls: list[list[str]] = []

    def predict(self, batch: Sequence[Prepared]) -> list[str]:
        names = [p.name for p in batch]
        self.calls.append(names)
        if self.bad & set(names):
            raise RuntimeError(f"cannot predict {sorted(self.bad & set(names))}")
        return [f"ab:{name}" for name in names]


def load(item: str) -> Prepared:
    """The fakes' decode: an ``undecodable...`` item fails as Pillow would."""
    if item.startswith("undecodable"):
        raise OSError(f"{item}: cannot identify image file")
    return Prepared(item)


def run(colorizer: FakeColorizer, items: Sequence[str], **kwargs: Any) -> Any:
    finished: list[tuple[str, str]] = []

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        if item.startswith("unwritable"):
            raise OSError("No space left on device")
        finished.append((item, prediction))

    failures = run_batches(cast(Any, colorizer), items, load, finish, **kwargs)
    return finished, failures


def test_batches_in_order_and_progress_per_batch() -> None:
    colorizer = FakeColorizer()
    done: list[int] = []
    items = [f"i{n}" for n in range(7)]
    finished, failures = run(colorizer, items, batch_size=3, progress=done.append)
    assert colorizer.calls == [["i0", "i1", "i2"], ["i3", "i4", "i5"], ["i6"]]
    assert finished == [(i, f"ab:{i}") for i in items]
    assert failures == []
    assert done == [3, 3, 1]


def test_a_failed_batch_is_retried_image_by_image(caplog: pytest.LogCaptureFixture) -> None:
    colorizer = FakeColorizer(bad=["b"])
    with caplog.at_level(logging.WARNING, logger="models.offline"):
        finished, failures = run(colorizer, ["a", "b", "c", "d"], batch_size=3)
    assert colorizer.calls == [["a", "b", "c"], ["a"], ["b"], ["c"], ["d"]]
    assert [item for item, _ in finished] == ["a", "c", "d"]
    assert [(item, type(exc)) for item, exc in failures] == [("b", RuntimeError)]
    assert "batch of 3 failed" in caplog.text and "retrying image by image" in caplog.text


def test_a_batch_of_one_is_not_predicted_twice() -> None:
    colorizer = FakeColorizer(bad=["b"])
    _, failures = run(colorizer, ["a", "b"], batch_size=1)
    assert colorizer.calls == [["a"], ["b"]]
    assert [item for item, _ in failures] == ["b"]


def test_load_and_finish_failures_are_recorded_and_the_rest_go_on() -> None:
    colorizer = FakeColorizer()
    items = ["a", "undecodable.jpg", "unwritable.png", "d"]
    finished, failures = run(colorizer, items, batch_size=2)
    assert colorizer.calls == [["a"], ["unwritable.png", "d"]]  # the bad file never reaches it
    assert [item for item, _ in finished] == ["a", "d"]
    assert [(item, describe_failure(exc)) for item, exc in failures] == [
        ("undecodable.jpg", "OSError: undecodable.jpg: cannot identify image file"),
        ("unwritable.png", "OSError: No space left on device"),
    ]


def test_an_unexpected_error_stops_the_run() -> None:
    class Broken(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            raise KeyError("a bug, not a bad input")

    with pytest.raises(KeyError):
        run(Broken(), ["a", "b"], batch_size=1)


def test_the_next_batch_loads_while_the_current_one_predicts() -> None:
    second_batch_loading = threading.Event()

    class Waiting(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            if batch[0].name == "a":  # the first batch waits until the reader reached batch 2
                assert second_batch_loading.wait(timeout=10), "no read-ahead"
            return super().predict(batch)

    def load(item: str) -> Prepared:
        if item == "c":
            second_batch_loading.set()
        return Prepared(item)

    finished: list[str] = []
    failures = run_batches(
        cast(Any, Waiting()), ["a", "b", "c", "d"], load,
        lambda item, prepared, prediction: finished.append(item), batch_size=2,
    )  # fmt: skip
    assert failures == []
    assert finished == ["a", "b", "c", "d"]


SEQUENTIAL = SEQUENTIAL_PLAN  # the runner before issue 18
PLANS = [
    SEQUENTIAL,
    PipelinePlan(loaders=1, read_ahead=0, finish_queue=1),
    PipelinePlan(loaders=3, read_ahead=3, finish_queue=2),
    None,  # pipeline_plan for this machine
]
WAIT = 10  # seconds: a hang guard only, every wait below is expected to return at once


def mixed_items() -> list[str]:
    """Good items with a bad file, a bad prediction and an unwritable output scattered in."""
    names = [f"i{n}" for n in range(14)]
    names[2] = "undecodable2"
    names[5] = "bad5"
    names[6] = "undecodable6"
    names[9] = "unwritable9"
    names[12] = "bad12"
    return names


def expected_outcome(items: Sequence[str], batch_size: int) -> tuple[list[tuple[str, str]], list]:
    """What the sequential runner gives, computed by hand: batch by batch, load failures, then
    predict failures, then finish failures."""
    finished, failures = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        failures += [(i, "OSError") for i in batch if i.startswith("undecodable")]
        failures += [(i, "RuntimeError") for i in batch if i.startswith("bad")]
        failures += [(i, "OSError") for i in batch if i.startswith("unwritable")]
        finished += [
            (i, f"ab:{i}") for i in batch if not i.startswith(("undecodable", "bad", "unwritable"))
        ]
    return finished, failures


@pytest.mark.parametrize("plan", PLANS, ids=["sequential", "no-read-ahead", "deep", "default"])
def test_every_plan_gives_the_sequential_results_in_the_same_order(plan: Any) -> None:
    items = mixed_items()
    log: list[tuple[str, object]] = []
    colorizer = FakeColorizer(bad=["bad5", "bad12"])

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        if item.startswith("unwritable"):
            raise OSError("No space left on device")
        log.append((item, prediction))

    failures = run_batches(
        cast(Any, colorizer), items, load, finish, batch_size=4,
        progress=lambda n: log.append(("progress", n)), plan=plan,
    )  # fmt: skip
    finished, expected_failures = expected_outcome(items, 4)
    assert [entry for entry in log if entry[0] != "progress"] == finished
    assert [(item, type(exc).__name__) for item, exc in failures] == expected_failures
    # progress after each batch's finishes, in batch order, with the batch's size
    progress_at = [n for n, entry in enumerate(log) if entry[0] == "progress"]
    assert [log[n][1] for n in progress_at] == [4, 4, 4, 2]
    last_of_batch = [max(n for n, e in enumerate(log) if e[0] in batch) for batch in
                     (items[0:4], items[4:8], items[8:12], items[12:14])]  # fmt: skip
    assert all(last < at for last, at in zip(last_of_batch, progress_at, strict=True))
    # the same predict calls: whole batches, then one by one for the batches holding a bad item
    assert colorizer.calls == [
        ["i0", "i1", "i3"],
        ["i4", "bad5", "i7"], ["i4"], ["bad5"], ["i7"],
        ["i8", "unwritable9", "i10", "i11"],
        ["bad12", "i13"], ["bad12"], ["i13"],
    ]  # fmt: skip


def test_the_next_batch_predicts_while_the_previous_one_finishes() -> None:
    second_predict = threading.Event()
    overlapped: list[bool] = []

    class Signalling(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            if batch[0].name == "c":
                second_predict.set()
            return super().predict(batch)

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        if item == "b":  # the last item of batch 1 finishes only once batch 2 is predicting
            overlapped.append(second_predict.wait(timeout=WAIT))

    plan = PipelinePlan(loaders=1, read_ahead=1, finish_queue=1)
    failures = run_batches(cast(Any, Signalling()), ["a", "b", "c", "d"], lambda i: Prepared(i),
                           finish, batch_size=2, plan=plan)  # fmt: skip
    assert failures == [] and overlapped == [True]


def test_a_blocked_finish_bounds_the_batches_loaded_ahead() -> None:
    plan = PipelinePlan(loaders=2, read_ahead=2, finish_queue=1)
    batch_size, batches = 2, 12
    # finish holds batch 0; batch 1 waits in the queue; batch 2 is predicted and waits to be
    # queued; batches 3 and 4 are the read-ahead: nothing more may be loaded
    bound = (1 + plan.finish_queue + 1 + plan.read_ahead) * batch_size
    items = [f"i{n}" for n in range(batch_size * batches)]
    release, third_predict, bound_reached, over = (threading.Event() for _ in range(4))
    loads: list[str] = []
    lock = threading.Lock()
    finished: list[str] = []

    class Signalling(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            if batch[0].name == f"i{2 * batch_size}":
                third_predict.set()
            return super().predict(batch)

    def load(item: str) -> Prepared:
        with lock:
            loads.append(item)
            if len(loads) == bound:
                bound_reached.set()
            if len(loads) > bound and not release.is_set():
                over.set()
        return Prepared(item)

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        if item == "i0":
            release.wait(timeout=WAIT)
        finished.append(item)

    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.append(run_batches(
        cast(Any, Signalling()), items, load, finish, batch_size=batch_size, plan=plan)))  # fmt: skip
    runner.start()
    try:
        assert third_predict.wait(timeout=WAIT)
        assert bound_reached.wait(timeout=WAIT)
        # the next load needs the put of batch 2, which needs finish to take batch 1: it cannot
        # have started while batch 0 is held, whatever the scheduling
        with lock:
            assert len(loads) == bound and not over.is_set()
    finally:
        release.set()
        runner.join(timeout=WAIT)
    assert not runner.is_alive() and result == [[]]
    assert finished == items and sorted(loads) == sorted(items)


class Bug(Exception):
    """Not one of the expected errors: it must stop the run."""


@pytest.mark.parametrize("stage", ["load", "predict", "finish"])
def test_an_unexpected_error_in_any_stage_stops_the_run_and_propagates(stage: str) -> None:
    items = [f"i{n}" for n in range(30)]
    plan = PipelinePlan(loaders=2, read_ahead=2, finish_queue=1)
    colorizer = FakeColorizer()
    finished: list[str] = []

    class Broken(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            if stage == "predict" and batch[0].name == "i4":
                raise Bug("predict")
            return colorizer.predict(batch)

    def load(item: str) -> Prepared:
        if stage == "load" and item == "i4":
            raise Bug("load")
        return Prepared(item)

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        if stage == "finish" and item == "i4":
            raise Bug("finish")
        finished.append(item)

    raised: list[BaseException] = []
    returned = threading.Event()

    def target() -> None:
        try:
            run_batches(cast(Any, Broken()), items, load, finish, batch_size=1, plan=plan)
        except BaseException as exc:
            raised.append(exc)
        returned.set()

    threading.Thread(target=target, daemon=True).start()
    assert returned.wait(timeout=WAIT), "the runner hung"
    assert [str(exc) for exc in raised] == [stage] and isinstance(raised[0], Bug)
    assert finished == items[: len(finished)] and "i4" not in finished
    assert len(colorizer.calls) < len(items)  # the run stopped early
    if stage == "finish":
        # the predict stage runs at most the queue plus the batch it holds ahead of the failure
        assert len(colorizer.calls) <= 5 + plan.finish_queue + 2
    else:
        assert len(finished) <= 4


def test_a_finish_error_with_the_queue_full_does_not_deadlock() -> None:
    plan = PipelinePlan(loaders=1, read_ahead=1, finish_queue=1)
    queue_full = threading.Event()

    class Signalling(FakeColorizer):
        def predict(self, batch: Sequence[Prepared]) -> list[str]:
            if batch[0].name == "i2":  # batch 0 finishing, batch 1 queued: this one must wait
                queue_full.set()
            return super().predict(batch)

    def finish(item: str, prepared: Any, prediction: Any) -> None:
        assert queue_full.wait(timeout=WAIT)
        raise Bug("finish")

    raised: list[BaseException] = []
    returned = threading.Event()

    def target() -> None:
        try:
            run_batches(cast(Any, Signalling()), [f"i{n}" for n in range(20)], lambda i: Prepared(i),
                        finish, batch_size=1, plan=plan)  # fmt: skip
        except BaseException as exc:
            raised.append(exc)
        returned.set()

    threading.Thread(target=target, daemon=True).start()
    assert returned.wait(timeout=WAIT), "the runner deadlocked on a full queue"
    assert len(raised) == 1 and isinstance(raised[0], Bug)


def test_pipeline_plan_keeps_the_host_within_its_cores() -> None:
    # CPU: the network's team + the finish thread + the loaders, at least one loader
    assert pipeline_plan(8, "cpu", 4) == PipelinePlan(loaders=3, read_ahead=4, finish_queue=1)
    assert pipeline_plan(2, "cpu", 1) == PipelinePlan(loaders=1, read_ahead=2, finish_queue=1)
    # a team on every core (torch's default) leaves no core to overlap on: the sequential schedule
    assert pipeline_plan(2, "cpu", 2) == SEQUENTIAL_PLAN == PipelinePlan(1, 1, 0)
    assert pipeline_plan(1, "cpu", 1) == SEQUENTIAL_PLAN
    # CUDA: the predict thread only launches kernels; loaders capped at MAX_LOADERS (4)
    assert pipeline_plan(4, "cuda", 4) == PipelinePlan(loaders=2, read_ahead=3, finish_queue=1)
    assert pipeline_plan(2, "cuda", 2) == PipelinePlan(loaders=1, read_ahead=2, finish_queue=1)
    assert pipeline_plan(64, "cuda", 1) == PipelinePlan(loaders=4, read_ahead=5, finish_queue=1)
    with pytest.raises(ValueError, match="loaders >= 1"):
        run(FakeColorizer(), ["a"], batch_size=1, plan=PipelinePlan(0, 1, 1))


def test_empty_input_and_a_bad_batch_size() -> None:
    assert run(FakeColorizer(), [], batch_size=4) == ([], [])
    with pytest.raises(ValueError, match="batch_size"):
        run(FakeColorizer(), ["a"], batch_size=0)


def test_failures_are_described_with_their_type() -> None:
    assert describe_failure(ValueError("bad mode")) == "ValueError: bad mode"
    assert describe_failure(EOFError()) == "EOFError: EOFError"


# -- atomic writes ------------------------------------------------------------------------------


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    write_text_atomic(target, "first\r\n")
    assert target.read_bytes() == b"first\r\n"  # no newline translation

    def half_then_fail(handle: Any) -> None:
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"first\r\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]  # no temporary file


def test_atomic_path_renames_only_after_the_block_succeeds(tmp_path: Path) -> None:
    target = tmp_path / "weights.pth"
    target.write_bytes(b"old")

    class ChecksumMismatch(Exception):
        pass

    def download_and_check() -> None:
        with atomic_path(target, ".part") as temp:
            assert temp.parent == tmp_path and temp.name.endswith(".part")
            temp.write_bytes(b"corrupt")
            raise ChecksumMismatch

    with pytest.raises(ChecksumMismatch):
        download_and_check()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]
    with atomic_path(target, ".part") as temp:
        temp.write_bytes(b"verified")
        assert target.read_bytes() == b"old"  # nothing replaced before the block ends
    assert target.read_bytes() == b"verified"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.pth"]


def test_the_shared_modules_import_neither_torch_nor_the_service() -> None:
    code = (
        "import sys\n"
        "import models.atomic, models.image_files\n"
        "print(sorted(m for m in ('torch', 'service', 'fastapi') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["models", "evaluation"])
def test_models_and_evaluation_never_import_the_service(package: str) -> None:
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n == "service" or n.startswith("service.")]  # fmt: skip
    assert offenders == []
