"""``train --model zhao-pixelated`` on a tiny colour set: losses, files, resume, labels, serving.

A narrow model (``divisor`` 16, 2-layer generator) keeps it to seconds on the CPU; the loss
decrease on a real model size is loadtests/bench_zhao_training.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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


def colour_set(root: Path, count: int = 4) -> Path:
    """``count`` blocky colour photos and a prepare-data manifest with one box each."""
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
        rows.append(ManifestRow(str(photos), f"p{i}.png", 64, 48, [[0, 0, 32, 48]], [0.9], "train"))
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
    # resume continues the step count
    resumed = ZhaoTrainOptions(
        data=data, output=run, max_steps=3, batch_size=2, log_every=1, resume=True, **TINY
    )
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
