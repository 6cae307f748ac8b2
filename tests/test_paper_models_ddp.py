"""torchrun for the paper models (li-dcnn, zhao-pixelated): 2 gloo processes x batch 1 against one
process x batch 2, from one launch of tests/ddp_steps.py that trains both models in turn.

Narrow networks (``--width-divisor``; zhao's 2-layer generator) and 64x64 photos keep the launch
to about a minute on two CPU cores; the rule checked is the one a full-size run follows.
"""

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
from test_training import GRADIENT_TOLERANCE, per_process_batchnorm
from torch.utils.data import DistributedSampler
from train_signals import sigterm_once_training

from models.li_dcnn import FILENAME, LiDCNN, grid_bin_centres, load_li_dcnn, set_bin_centres
from models.zhao_pixelated import ZhaoPixelated, load_zhao_pixelated
from service.cli import main
from training.li_dcnn import LabelledDataset, collate_labelled, image_labels
from training.li_losses import class_loss, colour_loss, rebalancing_weights, target_bins
from training.manifest import read_manifest
from training.run_files import read_metrics
from training.zhao_pixelated import (
    POLYAK_DECAY,
    ZhaoDataset,
    freeze_unused,
    weights_path,
    zhao_losses,
)

REPO = Path(__file__).resolve().parents[1]
LI_DIVISOR = 8
ZHAO_TINY = {"classes": 2, "generator_layers": 2, "generator_channels": 16, "divisor": 16}
ZHAO_FLAGS = ["--generator-layers", "2", "--generator-channels", "16", "--width-divisor", "16",
              "--lr", "1e-3"]  # fmt: skip
COMMON = ["--batch-size", "1", "--max-steps", "3", "--epochs", "2", "--device", "cpu",
          "--no-progress", "--log-every", "1", "--workers", "0"]  # fmt: skip


def colour_photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 64
    base = np.stack([200 * x + 30 * seed, 60 + 100 * y, 200 * (1 - x)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def photo_set(root: Path) -> tuple[Path, Path]:
    """4 training and 2 validation photos (prepare-data's manifest), and a 2-class labels CSV."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    lines = ["path,label"]
    for i in range(6):
        colour_photo(i).save(photos / f"p{i}.png")
        lines.append(f"p{i}.png,{'warm' if i % 2 else 'cool'}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = root / "data"
    assert main(["prepare-data", str(photos), "--output", str(data), "--no-progress",
                 "--no-detector", "--val-fraction", "0"]) == 0  # fmt: skip
    manifest = data / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["split"] = "val" if i >= 4 else "train"
        row["boxes"], row["scores"] = [[4.0, 4.0, 30.0 + i, 40.0]], [0.9]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, labels


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun: li-dcnn, then zhao-pixelated, each 3 steps of 2 processes x batch 1."""
    root = tmp_path_factory.mktemp("paper-ddp")
    data, labels = photo_set(root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    li = ["run:li", "--model", "li-dcnn", "--data", str(data), "--labels", str(labels),
          "--width-divisor", str(LI_DIVISOR), "--lr", "1e-4", *COMMON]  # fmt: skip
    zhao = ["run:zhao", "--model", "zhao-pixelated", "--data", str(data), *ZHAO_FLAGS, *COMMON]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "ddp_steps.py"), str(root / "runs"), *li, *zhao],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def ranks_of(runs: Path, name: str) -> list[dict[str, Any]]:
    ranks = [torch.load(runs / f"{name}.rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["code"] == ranks[1]["code"] == 0
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    for step_a, step_b in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        for key in ("before", "grad", "after"):
            assert all(torch.equal(a, b) for a, b in zip(step_a[key], step_b[key], strict=True))
    return ranks


def combined_order(size: int, epoch: int, position: int, batch: int) -> list[int]:
    """The indices one process with batch ``batch`` steps on: rank r's are [r::2] of them."""
    sampler = DistributedSampler(range(size), num_replicas=1, rank=0, shuffle=True, seed=0)  # type: ignore[arg-type]
    sampler.set_epoch(epoch)
    return list(sampler)[position * batch : (position + 1) * batch]


STEPS = [(0, 0), (0, 1), (1, 0)]  # (epoch, position) of the 3 steps: 2 batches of 2 an epoch


def li_setup(root: Path) -> tuple[LabelledDataset, LabelledDataset, torch.Tensor]:
    rows = read_manifest(root / "data")
    train = [r for r in rows if r.split == "train"]
    val = [r for r in rows if r.split == "val"]
    labels, classes = image_labels([*train, *val], root / "labels.csv")
    assert classes == ["cool", "warm"]
    state = torch.load(root / "runs" / "li" / "state.pt", weights_only=False)
    weights = rebalancing_weights(state["prior_counts"], grid_bin_centres())
    return (LabelledDataset(train, labels[:4], 0), LabelledDataset(val, labels[4:], 0), weights)


LI_ROUNDING_FACTOR = 3.0
"""li-dcnn's gradient is compared with the float64 gradient of the combined batch: per tensor,
|g_ddp - g_64| <= max(3 x |g_32 - g_64|, GRADIENT_TOLERANCE x max |g_64|), g_32 being one fp32
process's own gradient. The colour loss sums ~4096 weighted pixel terms of size ~5 and its
gradient passes 7 BatchNorm backwards (each a difference of large terms), so one fp32 process is
itself off by up to 1.4 % of the largest element in conv1 and fc1 (measured, Intel Xeon AMX); the
two gloo processes were within 1.14 x that at every step. A wrong average (a missing or doubled
half) is off by 50 % or more."""


def li_gradients(
    before: list[torch.Tensor], batch: dict[str, Any], weights: torch.Tensor, dtype: torch.dtype
) -> tuple[float, list[torch.Tensor]]:
    """One process's loss and gradients on ``batch`` at the parameters ``before``, in ``dtype``."""
    network = LiDCNN(2, divisor=LI_DIVISOR).train()
    set_bin_centres(network, grid_bin_centres())  # no --init: the grid rule
    network.to(dtype)
    trained = [p for p in network.parameters() if p.requires_grad]
    assert len(trained) == len(list(network.parameters())) - 1  # all but the bin centres
    with torch.no_grad():
        for p, value in zip(trained, before, strict=True):
            p.copy_(value)
    bins_logits, class_logits = network.logits(batch["l"].to(dtype))
    bins = target_bins(batch["ab"], grid_bin_centres())
    loss = colour_loss(bins_logits, bins, weights.to(dtype))
    loss = loss + class_loss(class_logits, batch["label"])
    return float(loss.detach()), list(torch.autograd.grad(loss, trained))


def test_li_dcnn_two_gloo_processes_equal_one_with_the_doubled_batch(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """li-dcnn under torchrun, 2 CPU processes x batch 1 against one process x batch 2.

    * Both ranks hold bit-identical parameters and gradients at every step.
    * The all-reduced gradient equals the gradient of the paper's loss (colour + class) on the
      combined batch at the weights the ranks held (LI_ROUNDING_FACTOR), and the logged loss its
      loss. Every parameter but the fixed bin centres gets a gradient (none unused, which DDP
      would refuse).
    * BatchNorm (ECCV16's trunk, in train mode): on CPU there is no SyncBatchNorm, so each process
      normalises with its own image's statistics; the single process is given the same per-half
      statistics (``per_process_batchnorm``) and then computes the same function. On CUDA the
      run converts to SyncBatchNorm and 2 x 1 is 1 x 2 without that.
    * Rank 0's weights file holds the last step's parameters.
    """
    root = ddp_runs
    steps = ranks_of(root / "runs", "li")[0]["steps"]
    train, _, weights = li_setup(root)
    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", per_process_batchnorm(2))
    losses = [r["loss"] for r in read_metrics(root / "runs" / "li") if r.get("split") != "val"]
    for k, (epoch, position) in enumerate(STEPS):
        batch = collate_labelled([train[epoch, i] for i in combined_order(4, epoch, position, 2)])
        loss, g32 = li_gradients(steps[k]["before"], batch, weights, torch.float32)
        _, g64 = li_gradients(steps[k]["before"], batch, weights, torch.float64)
        assert losses[k] == pytest.approx(loss, rel=1e-5)
        assert len(g32) == len(steps[k]["grad"])
        for mine, exact, theirs in zip(g32, g64, steps[k]["grad"], strict=True):
            scale = float(exact.abs().max())
            assert scale > 0
            own_error = float((mine.double() - exact).abs().max())
            atol = max(LI_ROUNDING_FACTOR * own_error, GRADIENT_TOLERANCE * scale)
            torch.testing.assert_close(theirs.double(), exact, rtol=0, atol=atol)
    config = json.loads((root / "runs" / "li" / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 2
    saved = load_li_dcnn(root / "runs" / "li" / "weights" / "li-dcnn" / FILENAME)
    named = dict(saved.named_parameters())
    order = [n for n, p in LiDCNN(2, divisor=LI_DIVISOR).named_parameters() if p.requires_grad]
    for name, value in zip(order, steps[-1]["after"], strict=True):
        assert torch.equal(named[name], value), name


def test_li_dcnn_sharded_validation_equals_one_process(ddp_runs: Path) -> None:
    """Each rank scored one of the 2 validation photos; the gathered result is one process's.

    The last validation (step 3) ran on the weights rank 0 then saved: one process scoring both
    photos in one batch with those weights (eval mode, running statistics) gets the same numbers.
    """
    root = ddp_runs
    _, val, weights = li_setup(root)
    rows = [r for r in read_metrics(root / "runs" / "li") if r.get("split") == "val"]
    assert [(r["step"], r["epoch"], r["images"]) for r in rows] == [(2, 1, 2), (3, 1, 2)]
    network = load_li_dcnn(root / "runs" / "li" / "weights" / "li-dcnn" / FILENAME)
    batch = collate_labelled([val[i] for i in range(2)])
    with torch.no_grad():
        bins_logits, class_logits = network.logits(batch["l"])
    colour = float(colour_loss(bins_logits, target_bins(batch["ab"], grid_bin_centres()), weights))
    klass = float(class_loss(class_logits, batch["label"]))
    accuracy = float((class_logits.argmax(1) == batch["label"]).float().mean())
    last = rows[-1]
    assert last["colour_loss"] == pytest.approx(colour, rel=1e-5)
    assert last["class_loss"] == pytest.approx(klass, rel=1e-5, abs=1e-6)
    assert last["loss"] == pytest.approx(colour + klass, rel=1e-5)
    assert last["class_accuracy"] == accuracy


def test_zhao_two_gloo_processes_equal_one_with_the_doubled_batch(ddp_runs: Path) -> None:
    """zhao-pixelated under torchrun, 2 CPU processes x batch 1 against one process x batch 2.

    * Bit-identical parameters and gradients on both ranks at every step, and every parameter has
      a gradient (DDP without unused parameters).
    * The all-reduced gradient is one process's gradient of 1 L_emb + 100 L_seg + 1 L_gen on the
      combined batch at the ranks' weights (no BatchNorm, so no deviation; box pseudo-labels, so
      every pixel counts in the segmentation mean on both sides), and the logged losses its.
    * The Polyak average is the same on both ranks after every update and is the exponential
      average (decay POLYAK_DECAY) of the steps' parameters, written out here; rank 0's weights
      file holds the last one.
    * Validation: both photos (one per rank), the averaged model's mean per-image losses.
    """
    root = ddp_runs
    ranks = ranks_of(root / "runs", "zhao")
    steps = ranks[0]["steps"]
    for avg_a, avg_b in zip(ranks[0]["averaged"], ranks[1]["averaged"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(avg_a, avg_b, strict=True))
    assert len(ranks[0]["averaged"]) == 3
    rows = read_manifest(root / "data")
    train = ZhaoDataset([r for r in rows if r.split == "train"], None)
    val = ZhaoDataset([r for r in rows if r.split == "val"], None)
    model = ZhaoPixelated(**ZHAO_TINY)
    assert freeze_unused(model) == ["generator.layers.1.cond_vertical.weight"]
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(steps[0]["grad"]) == len(list(model.parameters())) - 1
    logged = [r for r in read_metrics(root / "runs" / "zhao") if r.get("split") != "val"]
    for k, (epoch, position) in enumerate(STEPS):
        with torch.no_grad():
            for p, value in zip(params, steps[k]["before"], strict=True):
                p.copy_(value)
        items = [train[i] for i in combined_order(4, epoch, position, 2)]
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        losses = zhao_losses(model, batch)
        grads = torch.autograd.grad(losses.total, params)
        for key, value in losses.as_floats().items():
            assert logged[k][key] == pytest.approx(value, rel=1e-5), key
        for mine, theirs in zip(grads, steps[k]["grad"], strict=True):
            scale = float(mine.abs().max())
            assert scale > 0
            torch.testing.assert_close(theirs, mine, rtol=0, atol=GRADIENT_TOLERANCE * scale)
    every = [n for n, _ in model.named_parameters()]  # AveragedModel averages all of them
    averaged = dict(zip(every, ranks[0]["averaged"][-1], strict=True))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    ema = [p.clone() for p in steps[0]["after"]]  # the first update copies the parameters
    for k in (1, 2):
        ema = [POLYAK_DECAY * e + (1 - POLYAK_DECAY) * p
               for e, p in zip(ema, steps[k]["after"], strict=True)]  # fmt: skip
    for name, mine in zip(trained, ema, strict=True):
        torch.testing.assert_close(averaged[name], mine, rtol=1e-6, atol=1e-7)
    state = torch.load(root / "runs" / "zhao" / "state.pt", weights_only=False)
    frozen = "generator.layers.1.cond_vertical.weight"
    assert torch.equal(averaged[frozen], state["model"][frozen])  # never trained, never moved
    saved = load_zhao_pixelated(weights_path(root / "runs" / "zhao"))
    for name, value in saved.named_parameters():
        assert torch.equal(value, averaged[name]), name

    vals = [r for r in read_metrics(root / "runs" / "zhao") if r.get("split") == "val"]
    assert [(r["step"], r["epoch"], r["images"]) for r in vals] == [(2, 1, 2), (3, 1, 2)]
    with torch.no_grad():
        per_image = [
            zhao_losses(saved, {k: v[None] for k, v in val[i].items()}).as_floats()
            for i in range(2)
        ]
    for key in ("loss", "loss_emb", "loss_seg", "loss_gen"):
        want = sum(r[key] for r in per_image) / 2
        assert vals[-1][key] == pytest.approx(want, rel=1e-5), key
    config = json.loads((root / "runs" / "zhao" / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_batch_size"] == 2


def test_sigterm_to_torchrun_stops_both_ranks_at_one_step(tmp_path: Path) -> None:
    """SIGTERM to torchrun reaches both zhao-pixelated processes (torchrun passes it on); they
    agree on the step through the all-reduced stop flag and rank 0 saves that step. (li-dcnn's
    loop takes the same all-reduced flag.)"""
    data, _ = photo_set(tmp_path)
    run = tmp_path / "run"
    flags = ["--model", "zhao-pixelated", "--data", str(data), "--output", str(run),
             *ZHAO_FLAGS, *COMMON, "--epochs", "100000"]  # fmt: skip
    flags[flags.index("--max-steps") + 1] = "100000"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _, rest = sigterm_once_training([*torchrun, "-m", "service", "train", *flags], "step 1:")
    state = torch.load(run / "state.pt", weights_only=False)
    assert 1 <= state["step"] < 100000
    assert state["epoch"] * 2 + state["position"] == state["step"]  # 2 batches of 2 an epoch
    logged = [r["step"] for r in read_metrics(run) if r.get("split") != "val"]
    assert logged[-1] == state["step"]
    # both ranks stopped after the same step (each logs it), saved once by rank 0
    assert rest.count(f"stopped at step {state['step']}; continue with --resume") == 2, rest
    assert rest.count("stopped at step") == 2, rest
