"""Training (spec §6): loss, one hand-checked step per stage, overfitting, frozen parameters,
resume, torchrun, run-directory contract, prepare-data. Width-8 networks, 40x32 photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from train_signals import sigterm_once_training

from models.boxes import Detections
from models.checkpoints import load_networks
from models.pipeline import ColorizeOptions, Colorizer
from service.cli import main
from training.data import StageDataset, collate
from training.loop import ResumableSampler, TrainOptions, default_workers, train
from training.losses import colorization_loss, is_near_grey
from training.manifest import read_manifest, read_skipped
from training.prepare import prepare_data
from training.run_files import read_metrics
from training.stages import ADAM_BETAS, build_stage
from training.validation import interleave, shard

REPO = Path(__file__).resolve().parents[1]
STAGES = ("full", "instance", "fusion")
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


def write_photos(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    for i in range(10):
        photo(i).save(folder / ("sub" if i % 2 else "") / f"p{i}.png")
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photos(tmp_path / "photos")


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


@pytest.mark.parametrize("stage", STAGES)
def test_only_the_trained_parameters_require_gradients(stage: str, tiny_checkpoints: Path) -> None:
    """What DDP reduces is exactly what the optimiser steps: the class head and every frozen
    network excluded (a parameter the loss never reaches stalls DDP's reduction at step 2)."""
    model = build_stage(stage, load_networks(tiny_checkpoints))  # type: ignore[arg-type]
    wanted = {p for p in model.module.parameters() if p.requires_grad}
    assert wanted == set(model.parameters) and len(wanted) == len(model.parameters)
    for net in (model.networks.instance, model.networks.fusion, model.networks.full_image):
        assert not any(p.requires_grad for n, p in net.named_parameters() if "model_class" in n)
    model.set_mode(True)
    batch = synthetic_batch(stage)
    colorization_loss(model.module(batch), batch["ab"]).backward()
    assert all(p.grad is not None for p in model.parameters)  # every trained one is reached


def synthetic_batch(stage: str) -> dict[str, Any]:
    """One synthetic sample of ``stage`` (no files): a 256x256 L, its ab, two boxes for fusion."""
    torch.manual_seed(0)
    batch: dict[str, Any] = {
        "l": torch.rand(1, 1, 256, 256) - 0.5,
        "ab": torch.rand(1, 2, 256, 256) * 0.2,
    }
    if stage == "fusion":
        from models.boxes import FUSION_SCALES, box_info

        boxes = [(2, 3, 20, 25), (12, 6, 38, 30)]
        batch["crops"] = torch.rand(2, 1, 256, 256) - 0.5
        batch["box_info"] = [[{s: box_info(b, 40, 32, s) for s in FUSION_SCALES} for b in boxes]]
    return batch


def test_the_sampler_carries_the_epoch_to_persistent_workers(small_data: Path) -> None:
    """Workers keep their own dataset copy: the instance box of epoch e comes with the index."""
    rows = [r for r in read_manifest(small_data) if r.split == "train"]
    dataset = StageDataset(rows, "instance", seed=0)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(3)
    keys = list(sampler)
    assert sorted(i for _, i in keys) == list(range(len(dataset))) and {e for e, _ in keys} == {3}
    dataset.set_epoch(3)
    epoch, index = keys[0]
    assert torch.equal(
        StageDataset(rows, "instance", seed=0)[epoch, index]["l"], dataset[index]["l"]
    )
    crops = {bytes(StageDataset(rows, "instance", seed=0)[e, 0]["l"].numpy()) for e in range(8)}
    assert len(crops) == 2  # both boxes are chosen over the epochs


def test_sharded_validation_puts_the_images_back_in_order() -> None:
    shards = [list(shard(list(range(7)), 7, r, 3)) for r in range(3)]  # type: ignore[arg-type]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    rows = interleave([[{"i": float(i)} for i in s] for s in shards])
    assert [r["i"] for r in rows] == list(range(7))
    assert list(shard(list(range(3)), 3, 0, 1)) == [0, 1, 2]  # type: ignore[arg-type]


def test_default_workers_share_the_cpus_between_local_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(32)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert default_workers() == 1
    opts = TrainOptions(stage="full", data=Path(), init=Path(), output=Path()).resolved()
    assert opts.workers == 1 and opts.prefetch_factor == 4 and opts.persistent_workers


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


DDP_FLAGS = ["--lr", "1e-3", "--max-steps", "3", "--epochs", "1", "--decay-epochs", "2",
             "--device", "cpu", "--no-progress", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: Path) -> Path:
    """One torchrun of 2 gloo processes x batch 1 training each stage in turn (tests/ddp_steps.py).

    4 training photos (2 steps an epoch, so step 3 is in epoch 1 at a decayed lr and with the
    instance stage's new box choice) and 2 validation photos (one per rank); one persistent
    data-loading worker per process, as a GPU run has.
    """
    root = tmp_path_factory.mktemp("ddp")
    data = make_data(root, write_photos(root / "photos"), 4, 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    flags = ["--data", str(data), "--init", str(tiny_checkpoints), "--batch-size", "1",
             "--workers", "1", *DDP_FLAGS]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "ddp_steps.py"), str(root / "runs"), ",".join(STAGES), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "data").symlink_to(data)
    return root


def per_process_batchnorm(world: int) -> Any:
    """BatchNorm2d.forward as ``world`` DDP processes without SyncBatchNorm compute it.

    In train mode the batch ``x`` of one process stepping on the combined batch is split as the
    distributed sampler splits it (process r holds x[r::world]); each part is normalised with its
    own statistics. Running statistics: rank 0's, which DDP broadcasts before every forward and
    rank 0 saves: the last update kept is rank 0's part, from the statistics before the step.
    """
    original = torch.nn.BatchNorm2d.forward

    def forward(self: torch.nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return original(self, x)
        before = dict(self.named_buffers(recurse=False))
        parts: dict[int, torch.Tensor] = {}
        for rank in reversed(range(world)):  # fresh buffers each: backward keeps the ones it used
            for name, value in before.items():
                setattr(self, name, value.clone())
            parts[rank] = original(self, x[rank::world])
        return torch.stack([parts[r] for r in range(world)], 1).flatten(0, 1)

    return forward


GRADIENT_TOLERANCE = 5e-4
"""Per tensor, |g_ddp - g_one| <= 5e-4 x max |g_one|, on the same weights.

Both gradients are fp32 sums over the same n = 2 x 256 x 256 per-pixel terms (mean loss over the
combined batch), taken in another order: each process sums its half, the all-reduce adds the two
halves and halves the result, where one process sums the whole batch inside each kernel. A
reordered fp32 sum of n terms differs by about sqrt(n) x u (u = 6e-8): 2e-5 of the summands'
magnitude, which the tensor's largest gradient stands for only where terms do not cancel. Measured:
up to 2.3e-5 on an AVX512 EPYC, but 1.7e-4 in stage fusion on an AVX2-only EPYC (other oneDNN
kernels, and a small bias gradient that is a difference of larger terms); 5e-4 covers both, and a
wrong average (a missing or doubled half) is off by 50 % or more. One process with 1 against 2
threads differs as much. The weights are not compared over several
steps: from step 2 Adam carries such rounding into per-element changes up to a whole step (it
divides each gradient by its own magnitude, and one process with 1 or 2 threads diverges the same
way), so every step is checked from the weights the processes actually held."""


def combined_batch(data: Path, stage: str, epoch: int, position: int, size: int) -> dict[str, Any]:
    """What one process with batch ``size`` steps on at (epoch, position): the ranks' batches."""
    dataset = StageDataset([r for r in read_manifest(data) if r.split == "train"], stage, seed=0)  # type: ignore[arg-type]
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    order = list(sampler)[position * size : (position + 1) * size]
    return collate([dataset[epoch, i] for i in order])


@pytest.mark.parametrize("stage", STAGES)
def test_two_gloo_processes_equal_one_with_the_doubled_batch(
    stage: str, ddp_runs: Path, tiny_checkpoints: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun, 2 CPU processes x batch 1 against one process x batch 2, 3 steps of each stage.

    * Both ranks hold bit-identical trained parameters (and gradients) at every step: the same
      all-reduced gradient applied to the same weights.
    * At every step, the all-reduced gradient equals the gradient one process computes on the
      combined batch at the weights the ranks held, within GRADIENT_TOLERANCE, and the logged
      loss (mean over the ranks) its loss; the Adam update applied to it is the same code.
    * BatchNorm: the width-8 networks have it where the official ones do. Stages full and
      instance train with it in train mode, and on CPU (gloo, no SyncBatchNorm) each process
      normalises with the statistics of its own half, so the single process is given the same
      per-half statistics (``per_process_batchnorm``); it then computes the same function. Stage
      fusion keeps BN in eval mode (frozen statistics) and needs no change.
    * The run directory is rank 0's: its checkpoint holds the last step's weights, the networks
      the stage does not train are unchanged, and every validation is over both photos (one
      scored per rank).
    """
    ranks = [torch.load(ddp_runs / "runs" / f"{stage}.rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["code"] == ranks[1]["code"] == 0
    steps = ranks[0]["steps"]
    assert len(steps) == len(ranks[1]["steps"]) == 3
    for step_a, step_b in zip(steps, ranks[1]["steps"], strict=True):
        for key in ("before", "grad", "after"):
            assert all(torch.equal(a, b) for a, b in zip(step_a[key], step_b[key], strict=True))

    run = ddp_runs / "runs" / stage
    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", per_process_batchnorm(2))
    model = build_stage(stage, load_networks(tiny_checkpoints))  # type: ignore[arg-type]
    model.set_mode(True)
    losses = [r["loss"] for r in read_metrics(run) if r.get("split") != "val"]
    for k, (epoch, position) in enumerate([(0, 0), (0, 1), (1, 0)]):
        with torch.no_grad():
            for p, value in zip(model.parameters, steps[k]["before"], strict=True):
                p.copy_(value)
        batch = combined_batch(ddp_runs / "data", stage, epoch, position, 2)
        loss = colorization_loss(model.module(batch), batch["ab"])
        grads = torch.autograd.grad(loss, model.parameters)
        assert losses[k] == pytest.approx(float(loss.detach()), rel=1e-5)
        for mine, theirs in zip(grads, steps[k]["grad"], strict=True):
            scale = float(mine.abs().max())
            torch.testing.assert_close(theirs, mine, rtol=0, atol=GRADIENT_TOLERANCE * scale)
        assert any(float(g.abs().max()) > 0 for g in grads)

    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 2
    name = {"full": "latest_net_GComp.pth", "instance": "latest_net_G.pth",
            "fusion": "latest_net_GF.pth"}[stage]  # fmt: skip
    before, after = state_of(tiny_checkpoints), state_of(run / "checkpoints")
    trained = getattr(model.networks, {"full": "full_image", "instance": "instance",
                                       "fusion": "fusion"}[stage])  # fmt: skip
    name_of = {id(p): n for n, p in trained.named_parameters()}
    prefix = "module." if stage == "fusion" else ""
    for p, value in zip(model.parameters, steps[-1]["after"], strict=True):
        assert torch.equal(after[name][prefix + name_of[id(p)]], value)
    for other in {"latest_net_G.pth", "latest_net_GF.pth", "latest_net_GComp.pth"} - {name}:
        assert all(torch.equal(before[other][k], after[other][k]) for k in before[other])
    vals = [r for r in read_metrics(run) if r.get("split") == "val"]
    assert [r["step"] for r in vals] == [2, 3] and all(r["images"] == 2 for r in vals)


def test_sigterm_saves_and_resume_finishes(
    two_photos: Path, tiny_checkpoints: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    flags = ["--stage", "full", "--data", str(two_photos), "--init", str(tiny_checkpoints),
             "--output", str(run), "--batch-size", "1", "--workers", "0", "--device", "cpu",
             "--no-progress", "--log-every", "1", "--max-steps", "400"]  # fmt: skip
    assert sigterm_once_training(["-m", "service", "train", *flags], "step 1 ")[0] == 143
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
    # each box's COCO class (li-dcnn's labels), 1..90 (0 is the detector's background)
    assert len(row.labels) == len(row.boxes) and all(1 <= c <= 90 for c in row.labels)
