"""``colorize --engine ray`` on a real local Ray (one per module): the same bytes as the local
engine for every registry model and at batch sizes above one (the local engine's batches, its torch
thread count), bad inputs as report lines, verified resume, ``--skip-existing``, a killed actor,
zhao-pixelated samples and seeds, SIGGRAPH17 hints, and ``s3://`` sources read from a local S3
server (moto's) through pyarrow's S3FileSystem."""

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
from s3_server import CREDENTIALS, s3_environment, upload_folder
from weight_files import write_li_dcnn, write_zhao

from models.offline import run_batches
from models.registry import MODELS as REGISTRY
from service.cli import main
from service.commands.colorize_ray import PredictStage, build_on, plan_chunks
from service.commands.colorize_sources import Item

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

MODELS = tuple(REGISTRY)  # every registry model (a new one needs its weights fixture here)
WEIGHTS = {"larsson-eccv16": "larsson_weights", "li-dcnn": "li_weights",
           "zhao-pixelated": "zhao_weights"}  # fmt: skip
"""The weights fixture of the models that are not in ``zoo_weights``."""
REPORT = "colorize-report.jsonl"


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One small local Ray for the module; the command uses it as it is (``ray_session``).

    Its workers have S3 credentials of their own (the test server's), as a cluster's nodes have
    theirs (an instance role, their environment); the endpoint is only the driver's (``s3``
    sets it after this Ray started): it travels with the filesystem the driver resolved."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), **CREDENTIALS}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        yield
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def zhao_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zhao-weights")
    write_zhao(root)
    return root


@pytest.fixture(scope="module")
def li_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded li-dcnn weights with the real layer sizes (about 670 MB)."""
    root = tmp_path_factory.mktemp("li-weights")
    write_li_dcnn(root)
    return root


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


def colorize(source: Path | str, dest: Path, weights: Path, model: str, *extra: str) -> int:
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
    """zhao-pixelated with a seed (without one each run draws its own, on either engine)."""
    if model in WEIGHTS:
        zoo_weights = request.getfixturevalue(WEIGHTS[model])
    extra = ("--seed", "11") if model == "zhao-pixelated" else ()
    source = photos(tmp_path / "in", 3)
    assert colorize(source, tmp_path / "local", zoo_weights, model, *extra) == 0
    assert colorize(source, tmp_path / "ray", zoo_weights, model, *extra, "--engine", "ray") == 0
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


# -- samples (zhao-pixelated) and hints (zhang-siggraph17) -----------------------------------------


def test_zhao_samples_are_the_local_engines_files_and_a_rerun_keeps_the_seed(
    tmp_path: Path, zhao_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--samples 3 --seed 7`` at batch 2: the same ``<stem>.s<i>.png`` files, byte for byte; the
    report lists every sample and the seed. Rerun without ``--seed``: the report's seed is kept, so
    everything is verified and skipped; a deleted sample is drawn again with that seed."""
    source = photos(tmp_path / "in", 3)
    sampling = ("--samples", "3", "--seed", "7")
    assert colorize(source, tmp_path / "local", zhao_weights, "zhao-pixelated", *sampling) == 0
    dest = tmp_path / "ray"
    assert colorize(source, dest, zhao_weights, "zhao-pixelated", *sampling, "--engine", "ray") == 0
    assert "seed 7" in capsys.readouterr().out
    local = images_below(tmp_path / "local")
    assert sorted(local) == [f"p{k}.s{i}.png" for k in range(3) for i in range(3)]
    assert images_below(dest) == local
    assert len(set(local.values())) == 9  # the samples differ: a real draw, not one image thrice
    by_id = {line["custom_id"]: line for line in report_lines(dest)}
    assert set(by_id) == {"p0.png", "p1.jpg", "p2.png"}
    for custom_id, line in by_id.items():
        stem = custom_id.split(".")[0]
        files = [str(dest / f"{stem}.s{i}.png") for i in range(3)]
        assert line["status"] == "ok" and line["seed"] == 7 and line["output"] == files[0]
        assert line["samples"] == [{"output": f, "bytes": Path(f).stat().st_size} for f in files]

    (dest / "p1.s2.png").unlink()
    capsys.readouterr()
    assert colorize(source, dest, zhao_weights, "zhao-pixelated", "--samples", "3",
                    "--engine", "ray") == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "1 colorized, 0 failed, 2 skipped" in out and "seed 7" in out
    assert images_below(dest) == local
    assert {line["custom_id"]: line["status"] for line in report_lines(dest)} == {
        "p0.png": "skipped", "p1.jpg": "ok", "p2.png": "skipped"}  # fmt: skip


def test_a_manifests_samples_and_seed_are_the_local_engines(
    tmp_path: Path, zhao_weights: Path
) -> None:
    """Per-item ``samples``/``seed`` against local runs with the flags (batch 1, as they run)."""
    source = photos(tmp_path / "in", 2)
    one = ("--batch-size", "1")
    assert colorize(source / "p0.png", tmp_path / "a", zhao_weights, "zhao-pixelated", *one,
                    "--samples", "2", "--seed", "5") == 0  # fmt: skip
    assert colorize(source / "p1.jpg", tmp_path / "b", zhao_weights, "zhao-pixelated", *one,
                    "--seed", "3") == 0  # fmt: skip
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        json.dumps({"custom_id": "x/p0.png", "path": "in/p0.png", "samples": 2, "seed": 5}) + "\n"
        + json.dumps({"custom_id": "p1.jpg", "path": "in/p1.jpg", "seed": 3}) + "\n"
    )  # fmt: skip
    dest = tmp_path / "ray"
    assert colorize(manifest, dest, zhao_weights, "zhao-pixelated", *one, "--engine", "ray") == 0
    assert images_below(dest) == {
        "x/p0.s0.png": (tmp_path / "a" / "p0.s0.png").read_bytes(),
        "x/p0.s1.png": (tmp_path / "a" / "p0.s1.png").read_bytes(),
        "p1.png": (tmp_path / "b" / "p1.png").read_bytes(),
    }
    assert {line["custom_id"]: line["seed"] for line in report_lines(dest)} == {
        "x/p0.png": 5, "p1.jpg": 3}  # fmt: skip


HINTS_A = [{"x": 4, "y": 6, "color": "#3a7bd5", "size": 4}, {"x": 30, "y": 20, "ab": [40, 30]}]
HINTS_B = [{"x": 10, "y": 12, "color": "#d53a3a", "size": 7}]


def test_siggraph17_hints_are_the_local_engines_bytes(tmp_path: Path, zoo_weights: Path) -> None:
    """``--hints`` (an object per file name) at batch 2, and a manifest's per-item ``hints``."""
    source = photos(tmp_path / "in", 3)
    hints = tmp_path / "hints.json"
    hints.write_text(json.dumps({"p0.png": HINTS_A, "p2.png": HINTS_B}))
    flags = ("--hints", str(hints))
    model = "zhang-siggraph17"
    assert colorize(source, tmp_path / "local", zoo_weights, model, *flags) == 0
    assert colorize(source, tmp_path / "plain", zoo_weights, model) == 0
    assert colorize(source, tmp_path / "ray", zoo_weights, model, *flags, "--engine", "ray") == 0
    local = images_below(tmp_path / "local")
    assert sorted(local) == ["p0.png", "p1.png", "p2.png"]
    assert images_below(tmp_path / "ray") == local
    plain = images_below(tmp_path / "plain")
    assert local["p0.png"] != plain["p0.png"] and local["p2.png"] != plain["p2.png"]
    assert local["p1.png"] == plain["p1.png"]  # no hints for p1: what it is without

    one = ("--batch-size", "1")
    (tmp_path / "b.json").write_text(json.dumps(HINTS_B))
    assert colorize(source / "p1.jpg", tmp_path / "b", zoo_weights, model, *one,
                    "--hints", str(tmp_path / "b.json")) == 0  # fmt: skip
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        json.dumps({"custom_id": "p0.png", "path": "in/p0.png", "hints": HINTS_A}) + "\n"
        + json.dumps({"custom_id": "p1.jpg", "path": "in/p1.jpg", "hints": HINTS_B}) + "\n"
    )  # fmt: skip
    dest = tmp_path / "manifest"
    assert colorize(manifest, dest, zoo_weights, model, *one, "--engine", "ray") == 0
    assert images_below(dest) == {"p0.png": local["p0.png"],  # batch 1 and 2 agree here
                                  "p1.png": (tmp_path / "b" / "p1.png").read_bytes()}  # fmt: skip


# -- s3:// sources: a local S3 server (moto's), read through pyarrow's S3FileSystem ------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server; the driver's environment points the AWS SDK at it."""
    pytest.importorskip("moto")
    with s3_environment(monkeypatch, "AWS_ENDPOINT_URL") as endpoint:
        yield endpoint


def test_an_s3_prefix_and_an_s3_manifest_give_the_local_engines_bytes(
    tmp_path: Path, zoo_weights: Path, s3: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The photos in a bucket (``s3://scans/roll1/``, a sub-folder among them) against the local
    engine on the same files on disk: the same bytes, the report's sources the S3 URIs. A
    manifest whose paths are S3 URIs, one of them a missing key: the others written, that one a
    failed line saying it was not found (exit 1)."""
    source = photos(tmp_path / "in", 3)
    (source / "sub").mkdir()
    (source / "p2.png").rename(source / "sub" / "p2.png")
    upload_folder(s3, source, "scans", "roll1")
    model = "zhang-eccv16"
    assert colorize(source, tmp_path / "local", zoo_weights, model) == 0
    local = images_below(tmp_path / "local")
    assert sorted(local) == ["p0.png", "p1.png", "sub/p2.png"]

    dest = tmp_path / "ray"
    assert colorize("s3://scans/roll1/", dest, zoo_weights, model, "--engine", "ray") == 0
    assert "3 colorized, 0 failed, 0 skipped" in capsys.readouterr().out
    assert images_below(dest) == local
    lines = sorted(report_lines(dest), key=lambda line: str(line["custom_id"]))
    assert [(line["custom_id"], line["source"], line["status"]) for line in lines] == [
        ("p0.png", "s3://scans/roll1/p0.png", "ok"),
        ("p1.jpg", "s3://scans/roll1/p1.jpg", "ok"),
        ("sub/p2.png", "s3://scans/roll1/sub/p2.png", "ok"),
    ]
    for line in lines:
        assert line["bytes"] == Path(str(line["output"])).stat().st_size

    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        json.dumps({"custom_id": "a.png", "path": "s3://scans/roll1/p0.png"}) + "\n"
        + json.dumps({"custom_id": "gone.png", "path": "s3://scans/roll1/gone.png"}) + "\n"
        + json.dumps({"custom_id": "b.png", "path": "s3://scans/roll1/sub/p2.png"}) + "\n"
    )  # fmt: skip
    dest = tmp_path / "manifest"
    assert colorize(manifest, dest, zoo_weights, model, "--engine", "ray") == 1
    assert images_below(dest) == {"a.png": local["p0.png"], "b.png": local["sub/p2.png"]}
    by_id = {line["custom_id"]: line for line in report_lines(dest)}
    assert by_id["a.png"]["status"] == by_id["b.png"]["status"] == "ok"
    assert by_id["gone.png"]["status"] == "failed"
    assert "gone.png" in str(by_id["gone.png"]["error"])
    assert "failed: gone.png" in capsys.readouterr().err


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
