"""``train --model zhao-pixelated`` on a tiny colour set: losses, files, resume, labels, serving.

A narrow model (``divisor`` 16, 2-layer generator) keeps it to seconds on the CPU; the loss
decrease on a real model size is loadtests/bench_zhao_training.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from train_signals import sigterm_once_training

from models.zhao_pixelated import load_zhao_pixelated
from models.zoo import load_colorizer
from service.cli import main as cli
from training.manifest import MANIFEST_NAME, ManifestRow, append_jsonl, row_dict
from training.zhao_pixelated import (
    ADAM_BETAS,
    LOSS_WEIGHTS,
    POLYAK_DECAY,
    ZhaoDataset,
    ZhaoTrainOptions,
    segmentation_target,
    train_zhao,
    weights_path,
    zhao_losses,
)

TINY = {"generator_layers": 2, "generator_channels": 16, "divisor": 16}
TINY_FLAGS = ["--generator-layers", "2", "--generator-channels", "16", "--width-divisor", "16"]
REPO = Path(__file__).resolve().parents[1]


def colour_set(root: Path, count: int = 4, val: int = 0) -> Path:
    """``count`` blocky colour photos and a prepare-data manifest with one box each (the last
    ``val`` of them in the validation split)."""
    photos, data = root / "photos", root / "data"
    photos.mkdir()
    data.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, :32] = rng.integers(0, 255, 3)
        pixels[:, 32:] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
        split = "val" if i >= count - val else "train"
        rows.append(ManifestRow(str(photos), f"p{i}.png", 64, 48, [[0, 0, 32, 48]], [0.9], split))
    append_jsonl(data / MANIFEST_NAME, [row_dict(r) for r in rows])
    return data


def test_paper_hyperparameters() -> None:
    assert LOSS_WEIGHTS == (1.0, 100.0, 1.0)
    assert ADAM_BETAS == (0.95, 0.9995)
    assert 0.99 < POLYAK_DECAY < 1


def test_box_pseudo_labels_and_label_maps(tmp_path: Path) -> None:
    row = ManifestRow(str(tmp_path), "a.png", 64, 48, [[0, 0, 32, 48]], [0.9], "train")
    target = segmentation_target(row, None)
    assert target.shape == (32, 32)
    assert (target[:, :16] == 1).all() and (target[:, 16:] == 0).all()
    labels = tmp_path / "labels"
    labels.mkdir()
    Image.fromarray(np.full((48, 64), 17, dtype=np.uint8)).save(labels / "a.png")
    assert (segmentation_target(row, labels) == 17).all()
    with pytest.raises(FileNotFoundError, match="no label map"):
        segmentation_target(ManifestRow(str(tmp_path), "b.jpg", 8, 8, [], [], "train"), labels)


def test_losses_decrease_on_a_repeated_batch(tmp_path: Path) -> None:
    from models.zhao_pixelated import ZhaoPixelated

    data = colour_set(tmp_path, 2)
    rows = [ManifestRow(**json.loads(line)) for line in (data / MANIFEST_NAME).open()]
    dataset = ZhaoDataset(rows, None)
    batch = {k: torch.stack([dataset[i][k] for i in range(2)]) for k in dataset[0]}
    torch.manual_seed(0)
    model = ZhaoPixelated(classes=2, **TINY)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, betas=ADAM_BETAS)
    history = []
    for _ in range(12):
        losses = zhao_losses(model, batch)
        optimiser.zero_grad()
        losses.total.backward()
        optimiser.step()
        history.append(losses.as_floats())
    for key in ("loss", "loss_emb", "loss_seg", "loss_gen"):
        assert history[-1][key] < history[0][key], (key, history[0][key], history[-1][key])


def test_train_writes_weights_that_serve_and_resumes(tmp_path: Path) -> None:
    data = colour_set(tmp_path)
    run = tmp_path / "run"
    options = ZhaoTrainOptions(
        data=data, output=run, max_steps=2, batch_size=2, log_every=1, **TINY
    )
    assert train_zhao(options) == 0
    path = weights_path(run)
    assert path == run / "weights" / "zhao-pixelated" / "zhao_pixelated.pth"
    model = load_zhao_pixelated(path)
    assert model.config["classes"] == 2 and model.config["divisor"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    state = torch.load(run / "state.pt", weights_only=False)
    assert state["step"] == 2
    # the weights are the Polyak average, not the last iterate
    assert any(
        not torch.equal(state["model"][k], model.state_dict()[k])
        for k in state["model"]
        if k.endswith("weight")
    )
    # resume continues the step count (into a second epoch: the first one's 2 batches are done)
    resumed = ZhaoTrainOptions(
        data=data, output=run, max_steps=3, batch_size=2, log_every=1, resume=True, epochs=2,
        **TINY,
    )  # fmt: skip
    assert train_zhao(resumed) == 0
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # served strictly from RUN/weights
    pipeline = load_colorizer("zhao-pixelated", run / "weights")
    (result,) = pipeline.colorize([Image.new("RGB", (40, 30), (90, 90, 90))])
    assert result.image.size == (40, 30)


def test_train_command_zhao(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = colour_set(tmp_path, 2)
    run = tmp_path / "cli-run"
    flags = ["--data", str(data), "--output", str(run), "--no-progress", "--device", "cpu"]
    code = cli(["train", "--model", "zhao-pixelated", *flags, "--max-steps", "1", "--resume"])
    assert code == 2 and "nothing to resume" in capsys.readouterr().err
    assert cli(["train", *flags]) == 2
    assert "needs --stage and --init" in capsys.readouterr().err
    for refused, model in ((["--width-divisor", "2"], "instcolor"),
                           (["--generator-layers", "2"], "li-dcnn"),
                           (["--precision", "bf16"], "zhao-pixelated"),
                           (["--stage", "full"], "zhao-pixelated")):  # fmt: skip
        assert cli(["train", "--model", model, *flags, *refused]) == 2
        assert f"{refused[0]} is not for --model {model}" in capsys.readouterr().err
    # a batch larger than the photos: the message says what to change
    assert cli(["train", "--model", "zhao-pixelated", *flags, "--max-steps", "1"]) == 2
    assert "lower --batch-size or add photos" in capsys.readouterr().err


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """4 training photos, batch 1: stop after 2 steps (mid-epoch), resume to 6 (into epoch 1).

    The resumed run continues at the epoch's third batch (not its first), so the weights, the
    Polyak average, the optimiser and every logged loss and validation are the uninterrupted run's.
    """
    data = colour_set(tmp_path, 5, val=1)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = {"data": data, "batch_size": 1, "epochs": 2, "log_every": 1, **TINY}
    assert train_zhao(ZhaoTrainOptions(output=whole, max_steps=6, **common)) == 0  # type: ignore[arg-type]
    assert train_zhao(ZhaoTrainOptions(output=parts, max_steps=2, **common)) == 0  # type: ignore[arg-type]
    state = torch.load(parts / "state.pt", weights_only=False)
    assert (state["step"], state["epoch"], state["position"]) == (2, 0, 2)
    assert train_zhao(ZhaoTrainOptions(output=parts, max_steps=6, resume=True, **common)) == 0  # type: ignore[arg-type]
    a = torch.load(whole / "state.pt", weights_only=False)
    b = torch.load(parts / "state.pt", weights_only=False)
    for part in ("model", "averaged"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for sa, sb in zip(
        a["optimiser"]["state"].values(), b["optimiser"]["state"].values(), strict=True
    ):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["step"], sb["step"])

    def rows(run: Path) -> list[tuple[Any, ...]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r.get("split"), r["step"], r["epoch"], r["loss"]) for r in map(json.loads, lines)]

    # the resumed run's validation at its (extra) step-2 end is not in the whole run: drop it
    assert [r for r in rows(parts) if r[:2] != ("val", 2)] == rows(whole)
    assert [r[:3] for r in rows(whole)] == [
        *((None, s, 0) for s in (1, 2, 3, 4)),
        ("val", 4, 1),
        (None, 5, 1),
        (None, 6, 1),
        ("val", 6, 1),
    ]


def test_sigterm_saves_and_resume_finishes(tmp_path: Path) -> None:
    data = colour_set(tmp_path, 4)
    run = tmp_path / "run"
    flags = ["train", "--model", "zhao-pixelated", "--data", str(data), "--output", str(run),
             "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress",
             "--log-every", "1", "--epochs", "100000", *TINY_FLAGS, "--max-steps"]  # fmt: skip
    assert sigterm_once_training(["-m", "service", *flags, "100000"], "step 1:")[0] == 143
    state = torch.load(run / "state.pt", weights_only=False)
    assert 1 <= state["step"] < 100000
    assert state["epoch"] * 4 + state["position"] == state["step"]  # 4 batches an epoch
    stopped = state["step"]
    assert cli([*flags, str(stopped + 1), "--resume"]) == 0
    assert torch.load(run / "state.pt", weights_only=False)["step"] == stopped + 1
    assert load_zhao_pixelated(weights_path(run)).config["divisor"] == 16
