"""Run under torchrun by the DDP tests: ``python -m service train`` runs in turn, every rank
recording, at every optimiser step, its trained parameters before the step, their (all-reduced)
gradients and the parameters after the step.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_steps.py OUT full,fusion FLAGS...
    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_steps.py OUT \
        run:li --model li-dcnn FLAGS... run:zhao --model zhao-pixelated FLAGS...

The first form trains each InstColorization stage with the same FLAGS (``train --stage STAGE``);
the second runs ``train`` with each ``run:NAME``'s own flags (not ``--run``, which torchrun
takes for its ``--run-path``). One gloo process group serves all
the runs (``train`` uses a group it finds and leaves it running), so the test pays for one start
of the processes. Writes ``OUT/NAME.rankR.pt``: ``{"code": exit code, "steps": [{"before": [...],
"grad": [...], "after": [...]}, ...], "averaged": [[...], ...]}`` in the optimiser's parameter
order; "averaged" holds, after every ``AveragedModel.update_parameters`` (zhao-pixelated's Polyak
average), the averaged model's parameters. Rank 0 also writes the run directory ``OUT/NAME``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import (
    Optimizer,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.optim.swa_utils import AveragedModel

from service.cli import main as cli


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def record_steps(steps: list[dict[str, list[torch.Tensor]]]) -> list[Any]:
    """Global optimiser hooks appending copies of the parameters and gradients of each step."""

    def before(optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
        params = _params(optimizer)
        steps.append({"before": [p.detach().clone() for p in params],
                      "grad": [p.grad.detach().clone() for p in params]})  # fmt: skip

    def after(optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
        steps[-1]["after"] = [p.detach().clone() for p in _params(optimizer)]

    return [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]


def record_averages(averaged: list[list[torch.Tensor]]) -> Any:
    """Wrap ``AveragedModel.update_parameters`` to append the averaged parameters after each call;
    returns the function that restores it."""
    original = AveragedModel.update_parameters

    def update(self: AveragedModel, model: torch.nn.Module) -> None:
        original(self, model)
        averaged.append([p.detach().clone() for p in self.module.parameters()])

    AveragedModel.update_parameters = update  # type: ignore[method-assign]

    def restore() -> None:
        AveragedModel.update_parameters = original  # type: ignore[method-assign]

    return restore


def runs_of(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(name, train flags) per run: ``run:NAME FLAGS...`` groups, or ``STAGES FLAGS...``."""
    if not argv[0].startswith("run:"):
        stages, flags = argv[0].split(","), argv[1:]
        return [(stage, ["--stage", stage, *flags]) for stage in stages]
    runs: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("run:"):
            runs.append((token.removeprefix("run:"), []))
        else:
            runs[-1][1].append(token)
    return runs


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for name, flags in runs_of(argv[1:]):
        steps: list[dict[str, list[torch.Tensor]]] = []
        averaged: list[list[torch.Tensor]] = []
        handles = record_steps(steps)
        restore = record_averages(averaged)
        try:
            code = cli(["train", *flags, "--output", str(out / name)])
        finally:
            for handle in handles:
                handle.remove()
            restore()
        torch.save(
            {"code": code, "steps": steps, "averaged": averaged}, out / f"{name}.rank{rank}.pt"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
