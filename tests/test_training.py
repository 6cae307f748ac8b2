"""Training (spec §6): loss, one hand-checked step per stage, overfitting, frozen parameters,
resume, torchrun, run-directory contract, prepare-data. Width-8 networks, 40x32 photos."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from models.boxes import Detections
from models.checkpoints import load_networks
from models.pipeline import ColorizeOptions, Colorizer
from service.cli import main
from training.data import StageDataset, collate
from training.loop import TrainOptions, train
from training.losses import colorization_loss, is_near_grey
from training.manifest import read_manifest, read_skipped
from training.prepare import prepare_data
from training.run_files import read_metrics
from training.stages import ADAM_BETAS, build_stage

REPO = Path(__file__).resolve().parents[1]
FUSION_TRAINED = ("weight_layer.", "weight_layer2.", "weight_layer3.", "weight_layer4.",
                  "weight_layer5.", "weight_layer6.", "weight_layer7.", "weight_layer8_1.",
                  "weight_layer8_2.", "weight_layer9_1.", "weight_layer9_2.",
                  "weight_layer10_1.", "weight_layer10_2.", "model10.", "model_out.")  # fmt: skip


def photo(seed: int, size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A colourful picture: a smooth colour field plus a few saturated rectangles."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(3 * x + seed), np.cos(2 * y + seed), np.sin(x + y)], -1) * 0.5 + 0.5
    image = (base * 255).astype(np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        image[y0 : y0 + 8, x0 : x0 + 10] = rng.integers(0, 256, 3)
    return Image.fromarray(image)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(10):
        photo(i).save(folder / ("sub" if i % 2 else "") / f"p{i}.png")
    return folder


def make_data(tmp_path: Path, photos: Path, train: int, val: int) -> Path:
    """A manifest of ``train + val`` photos with two boxes each, as prepare-data stores them."""
    out = tmp_path / f"data{train}-{val}"
    prepare_data([photos], out, detector=None, val_fraction=0.0, progress=False)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    rows = rows[: train + val]
    for i, row in enumerate(rows):
        row["boxes"] = [[2.5, 3.0, 20.7, 25.2], [12.0 + i, 6.0, 38.9, 30.0]]
        row["scores"] = [0.95, 0.8]
        row["split"] = "val" if i >= train else "train"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture
def data_dir(tmp_path: Path, photos: Path) -> Path:
    """8 training and 2 validation photos."""
    return make_data(tmp_path, photos, 8, 2)


@pytest.fixture
def small_data(tmp_path: Path, photos: Path) -> Path:
    """4 training photos and 1 validation photo."""
    return make_data(tmp_path, photos, 4, 1)


@pytest.fixture
def two_photos(tmp_path: Path, photos: Path) -> Path:
    """2 training photos, no validation (the runs that only compare weights)."""
    return make_data(tmp_path, photos, 2, 0)


def options(data: Path, init: Path, out: Path, stage: Any, **kw: Any) -> TrainOptions:
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    return TrainOptions(stage=stage, data=data, init=init, output=out, **kw)


def state_of(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: torch.load(folder / name, weights_only=True)
        for name in ("latest_net_G.pth", "latest_net_GF.pth", "latest_net_GComp.pth")
    }


def test_loss_is_ten_times_the_summed_huber() -> None:
    torch.manual_seed(0)
    pred, target = torch.rand(2, 2, 4, 5) * 0.2, torch.rand(2, 2, 4, 5) * 0.2
    d = (pred - target).abs()
    delta = 1 / 110
    per = torch.where(d < delta, 0.5 * d**2 / delta, d - 0.5 * delta)
    expected = 10 * per.sum(dim=1).mean()
    assert torch.allclose(colorization_loss(pred, target), expected, rtol=1e-6)
    assert (d < delta).any() and (d >= delta).any()  # both branches exercised


def test_near_grey_filter_uses_the_ab_range() -> None:
    flat = torch.zeros(2, 8, 8)
    flat[0, 0, 0] = 9.9 / 110
    assert bool(is_near_grey(flat))
    flat[1, 0, 0] = 0.2 / 110
    assert not bool(is_near_grey(flat))


def first_batch(data: Path, stage: Any, batch_size: int) -> dict[str, Any]:
    dataset = StageDataset([r for r in read_manifest(data) if r.split == "train"], stage, seed=0)
    order = list(DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0))
    return collate([dataset[i] for i in order[:batch_size]])


def assert_only_fusion_head_changed(init: Path, run: Path) -> None:
    """Stage 3: G and GComp bit-identical; in GF only the weight generators, model10, model_out."""
    before, after = state_of(init), state_of(run / "checkpoints")
    for name in ("latest_net_G.pth", "latest_net_GComp.pth"):
        assert before[name].keys() == after[name].keys()
        for key in before[name]:
            assert torch.equal(before[name][key], after[name][key]), (name, key)
    gf_before, gf_after = before["latest_net_GF.pth"], after["latest_net_GF.pth"]
    assert gf_before.keys() == gf_after.keys()
    changed = {k for k in gf_before if not torch.equal(gf_before[k], gf_after[k])}
    trainable = {k for k in gf_before if k.removeprefix("module.").startswith(FUSION_TRAINED)}
    assert changed <= trainable  # BN statistics and every other tensor bit-identical
    assert {"module.model_out.0.weight", "module.model10.1.weight"} <= changed
    assert any(k.startswith("module.weight_layer8_2.") for k in changed)
    assert not any("running" in k for k in changed)


def assert_run_serves(run: Path, image: Image.Image) -> None:
    """The three official-layout files alone load strictly and colorize, with and without boxes."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest_net_G.pth",
        "latest_net_GComp.pth",
        "latest_net_GF.pth",
    ]
    colorizer = Colorizer(load_networks(run / "checkpoints"))
    boxes = ColorizeOptions(boxes=Detections.from_boxes([[2, 2, 30, 28]]))
    for result in colorizer.colorize([image, image], [ColorizeOptions(), boxes]):
        assert result.image.size == image.size and result.image.mode == "RGB"


@pytest.mark.parametrize("stage", ["full", "instance", "fusion"])
def test_one_step_equals_hand_computed_adam(
    stage: str, data_dir: Path, tiny_checkpoints: Path, tmp_path: Path
) -> None:
    """Loss formula and Adam update by hand; then the run directory serves (and for stage 3,
    only the parameters spec §6 trains have moved)."""
    batch_size, lr = 2, 1e-3
    model = build_stage(stage, load_networks(tiny_checkpoints))  # type: ignore[arg-type]
    model.set_mode(True)
    batch = first_batch(data_dir, stage, batch_size)
    pred = model.module(batch)
    d = (pred - batch["ab"]).abs()
    delta = 1 / 110
    loss = 10 * torch.where(d < delta, 0.5 * d**2 / delta, d - 0.5 * delta).sum(dim=1).mean()
    grads = torch.autograd.grad(loss, model.parameters)
    trained_net = getattr(
        model.networks, {"full": "full_image", "instance": "instance", "fusion": "fusion"}[stage]
    )
    name_of = {id(p): n for n, p in trained_net.named_parameters()}
    gradient = {name_of[id(p)]: g for p, g in zip(model.parameters, grads, strict=True)}
    b1, b2 = ADAM_BETAS
    with torch.no_grad():  # Adam's first step: bias-corrected moments of one gradient
        for p, g in zip(model.parameters, grads, strict=True):
            m_hat = (1 - b1) * g / (1 - b1)
            v_hat = (1 - b2) * g * g / (1 - b2)
            p -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    expected = trained_net.state_dict()  # includes the BN statistics of the forward pass

    run = tmp_path / "run"
    code = train(options(data_dir, tiny_checkpoints, run, stage, batch_size=batch_size, lr=lr,
                         max_steps=1, log_every=1))  # fmt: skip
    assert code == 0
    name = {"full": "latest_net_GComp.pth", "instance": "latest_net_G.pth",
            "fusion": "latest_net_GF.pth"}[stage]  # fmt: skip
    written = {k.removeprefix("module."): v for k, v in state_of(run / "checkpoints")[name].items()}
    assert written.keys() == expected.keys()
    steady = 0
    for key, value in expected.items():
        if key not in gradient:  # frozen tensors and BN statistics
            torch.testing.assert_close(written[key], value, rtol=1e-5, atol=1e-7)
            continue
        # Where |g| is near Adam's eps, or tiny against the tensor's largest gradient (sums that
        # cancel), the step g / (|g| + eps) turns on fp noise in g; those are only bounded.
        g = gradient[key].abs()
        clear = ((g > 1e-5) & (g > 1e-4 * g.max())) | (g == 0)
        steady += int(clear.sum())
        torch.testing.assert_close(written[key][clear], value[clear], rtol=1e-5, atol=1e-6)
        assert float((written[key] - value).abs().max()) <= 2 * lr
    assert steady > 0.5 * sum(g.numel() for g in grads)
    rows = read_metrics(run)
    assert rows[0]["step"] == 1 and rows[0]["epoch"] == 0 and rows[0]["lr"] == lr
    assert rows[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    val = rows[-1]
    assert val["split"] == "val" and val["images"] == 2
    assert {"loss", "psnr", "ssim", "colorfulness", "lpips"} <= val.keys()
    config = json.loads((run / "config.json").read_text())
    assert config["stage"] == stage and config["batch_size"] == 2 and config["epochs"] > 0
    assert_run_serves(run, photo(3, (60, 44)))
    if stage == "fusion":
        assert_only_fusion_head_changed(tiny_checkpoints, run)


def test_overfitting_eight_images_halves_the_loss(
    tmp_path: Path, photos: Path, tiny_checkpoints: Path
) -> None:
    run = tmp_path / "run"
    eight = make_data(tmp_path, photos, 8, 0)
    code = train(options(eight, tiny_checkpoints, run, "full", batch_size=2, lr=2e-3,
                         epochs=4, decay_epochs=0, log_every=1))  # fmt: skip
    assert code == 0
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 16
    assert max(losses[-3:]) < 0.5 * losses[0], losses
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_fresh_fusion_starts_from_the_full_image_trunk(tiny_checkpoints: Path) -> None:
    init = load_networks(tiny_checkpoints)
    model = build_stage("fusion", init, fresh_fusion=True)
    gf = model.networks.fusion.state_dict()
    for key, value in init.full_image.state_dict().items():
        assert torch.equal(gf[key], value), key
    weight = gf["weight_layer3.simple_instance_conv.0.weight"]
    assert abs(float(weight.std()) - 0.02) < 0.005
    assert float(gf["weight_layer3.simple_instance_conv.0.bias"].abs().max()) == 0.0


def test_instance_stage_starts_from_the_full_image_net(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    init = load_networks(tiny_checkpoints)
    fresh = build_stage("instance", init).networks.instance.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in init.full_image.state_dict().items())
    continued = build_stage("instance", init, init_stage="instance").networks.instance
    assert all(
        torch.equal(v, continued.state_dict()[k]) for k, v in init.instance.state_dict().items()
    )


def test_resume_after_k_steps_equals_an_uninterrupted_run(
    two_photos: Path, tiny_checkpoints: Path, tmp_path: Path
) -> None:
    """2 batches per epoch; stop after 2 steps (an epoch end), resume to 3 (lr decayed)."""
    common = {"batch_size": 1, "epochs": 1, "decay_epochs": 2, "log_every": 1, "lr": 1e-3}
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert (
        train(options(two_photos, tiny_checkpoints, whole, "instance", max_steps=3, **common)) == 0
    )
    assert (
        train(options(two_photos, tiny_checkpoints, parts, "instance", max_steps=2, **common)) == 0
    )
    assert train(options(two_photos, tiny_checkpoints, parts, "instance", max_steps=3,
                         resume=True, **common)) == 0  # fmt: skip
    a, b = state_of(whole / "checkpoints"), state_of(parts / "checkpoints")
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    steps_a = [(r["step"], r["epoch"], r["lr"]) for r in read_metrics(whole)]
    steps_b = [(r["step"], r["epoch"], r["lr"]) for r in read_metrics(parts)]
    assert steps_a == steps_b == [(1, 0, 1e-3), (2, 0, 1e-3), (3, 1, pytest.approx(1e-3 * 2 / 3))]


def test_two_gloo_processes_equal_one_with_the_doubled_batch(
    two_photos: Path, tiny_checkpoints: Path, tmp_path: Path
) -> None:
    """torchrun, 2 CPU processes x batch 1 vs one process x batch 2 (stage 3: BN frozen)."""
    single, double = tmp_path / "single", tmp_path / "ddp"
    flags = ["--stage", "fusion", "--data", str(two_photos), "--init", str(tiny_checkpoints),
             "--lr", "1e-3", "--max-steps", "2", "--workers", "0", "--device", "cpu",
             "--no-progress", "--log-every", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "service", "train", *flags, "--batch-size", "1", "--output", str(double)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", *flags, "--batch-size", "2", "--output", str(single)]) == 0
    a, b = state_of(single / "checkpoints"), state_of(double / "checkpoints")
    for name in a:
        for key in a[name]:
            # 1% of an Adam step (lr 1e-3): its g / (|g| + eps) magnifies rounding where g ~ eps
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-4, atol=1e-5)
    config = json.loads((double / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 2
    losses_a = [r["loss"] for r in read_metrics(single) if r.get("split") != "val"]
    losses_b = [r["loss"] for r in read_metrics(double) if r.get("split") != "val"]
    assert losses_a == pytest.approx(losses_b, rel=1e-4)


def test_sigterm_saves_and_resume_finishes(
    two_photos: Path, tiny_checkpoints: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    flags = ["--stage", "full", "--data", str(two_photos), "--init", str(tiny_checkpoints),
             "--output", str(run), "--batch-size", "1", "--workers", "0", "--device", "cpu",
             "--no-progress", "--log-every", "1", "--max-steps", "400"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "train", *flags], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the first logged step: training is under way
            if "step 1 " in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143
    finally:
        if process.poll() is None:
            process.kill()
    state = torch.load(run / "state.pt", weights_only=False)
    assert 1 <= state["step"] < 400
    rows = read_metrics(run)
    assert rows[-1]["step"] == state["step"]
    stopped = state["step"]
    assert main([*["train"], *flags[:-1], str(stopped + 1), "--resume"]) == 0
    assert torch.load(run / "state.pt", weights_only=False)["step"] == stopped + 1
    photo(5, (70, 50)).save(tmp_path / "input.png")  # the run directory serves the CLI as it is
    code = main(["colorize", str(tmp_path / "input.png"), "-o", str(tmp_path / "out"),
                 "--checkpoints", str(run / "checkpoints"), "--no-detector", "--no-progress"])  # fmt: skip
    assert code == 0
    assert Image.open(tmp_path / "out" / "input.png").size == (70, 50)


def test_usage_errors_are_clear(
    small_data: Path, tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", "--stage", "full", "--data", str(small_data), "--init", str(tiny_checkpoints),
            "--output", str(tmp_path / "run"), "--no-progress", "--workers", "0"]  # fmt: skip
    assert main([*base, "--batch-size", "16"]) == 2
    assert "4 training images" in capsys.readouterr().err
    assert main([*base, "--resume", "--batch-size", "2"]) == 2
    assert "state.pt" in capsys.readouterr().err
    missing = ["train", "--stage", "full", "--data", str(tmp_path / "nothing"), "--init",
               str(tiny_checkpoints), "--output", str(tmp_path / "run2"), "--no-progress"]  # fmt: skip
    assert main(missing) == 2
    assert "prepare-data" in capsys.readouterr().err


def test_prepare_data_resumes_and_skips_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    (photos / "a" / "b").mkdir(parents=True)
    for i in range(4):
        photo(i, (50 + i, 30)).save(photos / ("a/b" if i % 2 else "a") / f"c{i}.jpg", quality=95)
    Image.new("RGB", (40, 30), (120, 120, 121)).save(photos / "grey.png")
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    (photos / "notes.txt").write_text("not an image")
    loose = tmp_path / "loose.png"
    photo(9).save(loose)
    out = tmp_path / "data"
    args = ["prepare-data", str(photos), str(loose), "--output", str(out), "--no-detector",
            "--no-progress", "--val-fraction", "0.3"]  # fmt: skip
    assert main(args) == 1  # the broken file is reported, the others are written
    err = capsys.readouterr().err
    assert "broken.png" in err and "1 unreadable" in err and "5 added" in err
    rows = read_manifest(out)
    assert sorted(r.path for r in rows) == [
        "a/b/c1.jpg",
        "a/b/c3.jpg",
        "a/c0.jpg",
        "a/c2.jpg",
        "loose.png",
    ]
    by_path = {r.path: r for r in rows}
    assert (by_path["a/c2.jpg"].width, by_path["a/c2.jpg"].height) == (52, 30)
    assert all(r.boxes == [] and r.scores == [] and r.split in ("train", "val") for r in rows)
    assert [s["path"] for s in read_skipped(out)] == ["grey.png"]

    (photos / "late.png").write_bytes((photos / "a" / "c0.jpg").read_bytes())
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 added" in err and "6 already done" in err and "broken.png" in err
    assert len(read_manifest(out)) == 6  # nothing written twice
    with (out / "manifest.jsonl").open("a") as handle:  # a crash mid-line
        handle.write('{"root": "/x", "pa')
    assert main(args) == 1
    assert len(read_manifest(out)) == 6


@pytest.mark.slow
def test_prepare_data_stores_detector_boxes(
    tmp_path: Path, detector_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The random-weight detector at threshold 0: at most 8 boxes, best first, inside the image."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(1, (64, 48)).save(photos / "one.png")
    out = tmp_path / "data"
    code = main(["prepare-data", str(photos), "--output", str(out), "--no-progress",
                 "--detector-weights", str(detector_weights), "--score-threshold", "0.0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (row,) = read_manifest(out)
    assert 1 <= len(row.boxes) <= 8 and len(row.scores) == len(row.boxes)
    assert row.scores == sorted(row.scores, reverse=True)
    assert all(0 <= x1 <= x2 <= 64 and 0 <= y1 <= y2 <= 48 for x1, y1, x2, y2 in row.boxes)
