"""``colorize --engine ray`` on a real local Ray (one per module): the same bytes as the local
engine for every registry model and at batch sizes above one (the local engine's batches, its torch
thread count), bad inputs as report lines, verified resume, ``--skip-existing``, a killed actor."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.offline import run_batches
from service.cli import main
from service.commands.colorize_ray import PredictStage, build_on, plan_chunks
from service.commands.colorize_sources import Item

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

MODELS = ("instcolor", "zhang-eccv16", "zhang-siggraph17", "larsson-eccv16")  # the registry's
REPORT = "colorize-report.jsonl"


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One small local Ray for the module; the command uses it as it is (``ray_session``)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )
    try:
        yield
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def gray(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    noise = rng.normal(0, 25, (height, width))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="L")


def photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        suffix = ".jpg" if i % 2 else ".png"
        gray(40 + 8 * i, 32 + 4 * i, seed=i).save(folder / f"p{i}{suffix}")
    return folder


def colorize(source: Path, dest: Path, weights: Path, model: str, *extra: str) -> int:
    argv = ["colorize", str(source), "-o", str(dest), "--no-progress", "--no-detector",
            "--weights-dir", str(weights), "--model", model, "--precision", "fp32",
            "--device", "cpu", "--batch-size", "2", *extra]  # fmt: skip
    if model == "instcolor":
        argv += ["--checkpoints", str(weights / "checkpoints")]
    return main(argv)


def bench_photos(folder: Path, count: int) -> Path:
    """``loadtests/bench_ray.py``'s 128x96 images: with the tiny instcolor weights the 7th one
    (``img006``) comes out 1 level apart at 1 torch thread against 2 (measured)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 128)[None, :].repeat(96, axis=0)
    for i in range(count):
        pixels = np.clip(base + rng.normal(0, 25, (96, 128)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"img{i:03d}.png")
    return folder


def images_below(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def report_lines(dest: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (dest / REPORT).read_text().splitlines()]


@pytest.mark.parametrize("model", MODELS)
def test_ray_output_is_byte_identical_to_the_local_engine(
    tmp_path: Path, zoo_weights: Path, model: str, request: pytest.FixtureRequest
) -> None:
    if model == "larsson-eccv16":
        zoo_weights = request.getfixturevalue("larsson_weights")
    source = photos(tmp_path / "in", 3)
    assert colorize(source, tmp_path / "local", zoo_weights, model) == 0
    assert colorize(source, tmp_path / "ray", zoo_weights, model, "--engine", "ray") == 0
    local, on_ray = images_below(tmp_path / "local"), images_below(tmp_path / "ray")
    assert sorted(local) == ["p0.png", "p1.png", "p2.png"]
    assert on_ray == local
    lines = report_lines(tmp_path / "ray")
    assert sorted(str(line["custom_id"]) for line in lines) == ["p0.png", "p1.jpg", "p2.png"]
    assert {line["status"] for line in lines} == {"ok"}
    for line in lines:
        assert line["bytes"] == Path(str(line["output"])).stat().st_size


def test_a_corrupt_input_is_a_failed_line_and_the_rest_complete(
    tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = photos(tmp_path / "in", 2)
    (source / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dest = tmp_path / "out"
    assert colorize(source, dest, zoo_weights, "instcolor", "--engine", "ray") == 1
    by_id = {line["custom_id"]: line for line in report_lines(dest)}
    assert set(by_id) == {"p0.png", "p1.jpg", "broken.png"}
    assert by_id["broken.png"]["status"] == "failed"
    assert by_id["broken.png"]["error"]
    assert not (dest / "broken.png").exists()
    assert by_id["p0.png"]["status"] == by_id["p1.jpg"]["status"] == "ok"
    assert sorted(images_below(dest)) == ["p0.png", "p1.png"]
    assert "failed: broken.png" in capsys.readouterr().err


def test_rerun_skips_verified_outputs_without_recomputing(
    tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = photos(tmp_path / "in", 3)
    dest = tmp_path / "out"
    assert colorize(source, dest, zoo_weights, "instcolor", "--engine", "ray") == 0
    first = {p: p.stat().st_mtime_ns for p in dest.glob("*.png")}
    (dest / "p2.png").write_bytes(b"truncated")  # fails verification: recomputed
    capsys.readouterr()
    time.sleep(0.01)
    assert colorize(source, dest, zoo_weights, "instcolor", "--engine", "ray") == 0
    assert "1 colorized, 0 failed, 2 skipped" in capsys.readouterr().out
    by_id = {line["custom_id"]: line for line in report_lines(dest)}
    assert by_id["p0.png"]["status"] == by_id["p1.jpg"]["status"] == "skipped"
    assert by_id["p2.png"]["status"] == "ok"
    for name in ("p0.png", "p1.png"):
        assert (dest / name).stat().st_mtime_ns == first[dest / name]
    assert (dest / "p2.png").stat().st_mtime_ns != first[dest / "p2.png"]
    with Image.open(dest / "p2.png") as image:
        image.verify()


def _predict_actor_pids() -> list[int]:
    pids = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "PredictStage" in cmdline:
            pids.append(process.info["pid"])
    return pids


def test_killing_the_colorizer_actor_mid_run_loses_nothing(
    tmp_path: Path, zoo_weights: Path
) -> None:
    source = photos(tmp_path / "in", 8)
    assert colorize(source, tmp_path / "local", zoo_weights, "zhang-eccv16") == 0
    dest = tmp_path / "ray"
    killed: list[int] = []
    stop = threading.Event()

    def kill_once_outputs_appear() -> None:
        while not stop.is_set():
            pids = _predict_actor_pids()
            if pids and any(dest.glob("*.png")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_once_outputs_appear, daemon=True)
    killer.start()
    try:
        code = colorize(source, dest, zoo_weights, "zhang-eccv16", "--engine", "ray",
                        "--batch-size", "1")  # fmt: skip
    finally:
        stop.set()
        killer.join(timeout=5)
    assert killed, "the run ended before the colorizer actor could be killed"
    assert code == 0
    lines = report_lines(dest)
    ids = [str(line["custom_id"]) for line in lines]
    assert sorted(ids) == sorted(p.name for p in source.iterdir())  # every item exactly once
    assert {line["status"] for line in lines} == {"ok"}
    assert images_below(dest) == images_below(tmp_path / "local")


class RecordingColorizer:
    """The local engine's runner's view of a colorizer: records each ``predict`` batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def predict(self, batch: list[str]) -> list[str]:
        self.batches.append(list(batch))
        return list(batch)


def test_chunks_are_the_local_engines_batches(tmp_path: Path) -> None:
    items = [Item(f"p{i}.png", f"/in/p{i}.png", tmp_path / f"p{i}.png", {}) for i in range(5)]
    for size in (1, 2, 3, 5, 8):
        local = RecordingColorizer()
        failures = run_batches(local, [item.custom_id for item in items], lambda x: x,
                               lambda *_: None, batch_size=size)  # fmt: skip
        assert failures == []
        chunks = [
            [m["custom_id"] for m in json.loads(row["items"])] for row in plan_chunks(items, size)
        ]
        assert chunks == local.batches


def test_a_cpu_colorizer_actor_runs_torch_with_the_local_engines_threads(
    zoo_weights: Path,
) -> None:
    import torch

    from service.settings import ModelSettings

    settings = ModelSettings(weights_dir=zoo_weights, models="zhang-eccv16", device="cpu",
                             precision="fp32")  # fmt: skip
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as Ray leaves a 1-CPU actor (OMP_NUM_THREADS=1)
        PredictStage(lambda device: build_on(settings, device), torch_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_ray_output_is_byte_identical_at_batch_size_3(tmp_path: Path, zoo_weights: Path) -> None:
    """7 images in chunks of 3, 3 and 1; with Ray's 1 thread in the colorizer actor (before
    ``torch_threads``), ``img006`` differed from the local engine's (measured at batch 2)."""
    source = bench_photos(tmp_path / "in", 7)
    assert colorize(source, tmp_path / "local", zoo_weights, "instcolor", "--batch-size", "3") == 0
    assert colorize(source, tmp_path / "ray", zoo_weights, "instcolor", "--batch-size", "3",
                    "--engine", "ray") == 0  # fmt: skip
    local = images_below(tmp_path / "local")
    assert len(local) == 7
    assert images_below(tmp_path / "ray") == local


def test_skip_existing_finishes_a_folder_the_local_engine_left_half_done(
    tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = photos(tmp_path / "in", 3)
    dest = tmp_path / "out"
    assert colorize(source, dest, zoo_weights, "zhang-eccv16") == 0
    (dest / "p1.png").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.png")}
    local = images_below(dest)
    capsys.readouterr()
    assert colorize(source, dest, zoo_weights, "zhang-eccv16", "--engine", "ray",
                    "--skip-existing") == 0  # fmt: skip
    assert "1 colorized, 0 failed, 2 skipped" in capsys.readouterr().out
    by_id = {line["custom_id"]: line for line in report_lines(dest)}
    assert {k: v["status"] for k, v in by_id.items()} == {
        "p0.png": "skipped", "p1.jpg": "ok", "p2.png": "skipped"}  # fmt: skip
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.png") if p.name in kept} == kept
    for line in by_id.values():
        assert line["bytes"] == Path(str(line["output"])).stat().st_size
    fresh = tmp_path / "fresh"
    assert colorize(source, fresh, zoo_weights, "zhang-eccv16") == 0
    assert images_below(dest) == images_below(fresh)
    assert set(local) == {"p0.png", "p2.png"}


def test_a_manifest_gives_each_item_the_local_engines_bytes_for_its_own_options(
    tmp_path: Path, zoo_weights: Path
) -> None:
    """Per-item options of a manifest (as in the batch API) against local runs with the flags."""
    source = photos(tmp_path / "in", 2)
    one = ("--batch-size", "1")
    assert colorize(source / "p0.png", tmp_path / "a", zoo_weights, "instcolor", *one) == 0
    assert colorize(source / "p1.jpg", tmp_path / "b", zoo_weights, "instcolor", *one,
                    "--saturation", "0.5") == 0  # fmt: skip
    assert colorize(source / "p1.jpg", tmp_path / "c", zoo_weights, "instcolor", *one) == 0
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        json.dumps({"custom_id": "first/p0.png", "path": "in/p0.png"}) + "\n"
        + json.dumps({"custom_id": "p1.jpg", "path": "in/p1.jpg", "saturation": 0.5}) + "\n"
    )  # fmt: skip
    dest = tmp_path / "ray"
    assert colorize(manifest, dest, zoo_weights, "instcolor", *one, "--engine", "ray") == 0
    assert images_below(dest) == {
        "first/p0.png": (tmp_path / "a" / "p0.png").read_bytes(),
        "p1.png": (tmp_path / "b" / "p1.png").read_bytes(),
    }
    assert (tmp_path / "b" / "p1.png").read_bytes() != (tmp_path / "c" / "p1.png").read_bytes()
    assert sorted(str(line["custom_id"]) for line in report_lines(dest)) == [
        "first/p0.png",
        "p1.jpg",
    ]


def test_ray_passes_the_temperature_through(tmp_path: Path, zoo_weights: Path) -> None:
    """``--temperature`` reaches the colorizer actor (``to_options``): the same bytes as the local
    engine at that temperature, and not those of the default."""
    source = photos(tmp_path / "in", 3)
    flags = ("--temperature", "0.38")
    assert colorize(source, tmp_path / "local", zoo_weights, "zhang-eccv16", *flags) == 0
    assert colorize(source, tmp_path / "ray", zoo_weights, "zhang-eccv16", *flags,
                    "--engine", "ray") == 0  # fmt: skip
    assert colorize(source, tmp_path / "default", zoo_weights, "zhang-eccv16") == 0
    local = images_below(tmp_path / "local")
    assert len(local) == 3 and images_below(tmp_path / "ray") == local
    assert images_below(tmp_path / "default") != local
