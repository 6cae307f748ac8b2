"""The offline batch runner (``models.offline``) and the atomic writes (``models.atomic``).

The runner is driven by a hand-written colorizer whose ``predict`` fails on chosen inputs, so the
read-ahead, the per-image retry and the failure list are checked without weights.
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
from models.offline import describe_failure, run_batches

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


def run(colorizer: FakeColorizer, items: Sequence[str], **kwargs: Any) -> Any:
    finished: list[tuple[str, str]] = []

    def load(item: str) -> Prepared:
        if item.startswith("undecodable"):
            raise OSError(f"{item}: cannot identify image file")
        return Prepared(item)

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
