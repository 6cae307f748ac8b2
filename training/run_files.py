"""The run directory, the contract other tools rely on.

``RUN_DIR/checkpoints/latest_net_{G,GF,GComp}.pth``: the official layout (plain state dicts, GF
keys prefixed ``module.`` like the authors' file), loadable by ``serve`` and ``colorize`` alone,
with ``hints.json`` beside them when trained with hints (then the pipeline takes hints);
``RUN_DIR/state.pt``: everything ``--resume`` needs; ``RUN_DIR/metrics.jsonl``: one JSON object
per logged step and per validation; ``RUN_DIR/config.json``: every resolved option;
``RUN_DIR/curves.png``: loss and validation curves. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.atomic import write_bytes_atomic, write_text_atomic
from models.checkpoints import ColorizationNetworks, load_networks, write_hints_marker
from training.atomic import save_torch_atomic

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "state.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
PLOT_NAME = "curves.png"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / CHECKPOINT_DIR).is_dir()


def load_init(path: Path) -> tuple[ColorizationNetworks, str | None]:
    """Networks from an official folder, an MMagic file or a run directory (and the run's stage)."""
    if path.is_dir() and is_run_dir(path):
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        return load_networks(path / CHECKPOINT_DIR), str(config.get("stage"))
    return load_networks(path), None


def _cpu_state(net: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        prefix + k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in net.state_dict().items()
    }


def save_checkpoints(
    networks: ColorizationNetworks, run_dir: Path, hint_sample_p: float = 1.0
) -> None:
    """The three networks in the official layout under ``RUN_DIR/checkpoints``, with the hints
    marker (``models.checkpoints.HINTS_MARKER``) when the run trained with hints (P < 1)."""
    folder = run_dir / CHECKPOINT_DIR
    save_torch_atomic(_cpu_state(networks.instance), folder / "latest_net_G.pth")
    save_torch_atomic(_cpu_state(networks.fusion, "module."), folder / "latest_net_GF.pth")
    save_torch_atomic(_cpu_state(networks.full_image), folder / "latest_net_GComp.pth")
    write_hints_marker(folder, hint_sample_p)


def save_state(state: dict[str, Any], run_dir: Path) -> None:
    save_torch_atomic(state, run_dir / STATE_NAME)


def load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume (no state.pt in the run directory)")
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    write_text_atomic(run_dir / CONFIG_NAME, json.dumps(config, indent=2, default=str) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Rewrite metrics.jsonl whole (atomic): a resumed run drops rows past its saved step."""
    text = "".join(json.dumps({k: _json_safe(v) for k, v in row.items()}) + "\n" for row in rows)
    write_text_atomic(run_dir / METRICS_NAME, text)


def plot_curves(rows: list[dict[str, Any]], run_dir: Path) -> None:
    """Training loss per logged step and validation loss/PSNR per validation, as one PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") != "val"]
    val = [r for r in rows if r.get("split") == "val"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
        psnr = [(r["step"], r["psnr"]) for r in val if r.get("psnr") is not None]
        if psnr:
            axes[1].plot(*zip(*psnr, strict=True), "o-", color="tab:green", label="val PSNR")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("PSNR (dB)")
    if axes[1].lines:
        axes[1].legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(run_dir / PLOT_NAME, buffer.getvalue())
