"""Run under torchrun by tests/test_training.py: ``python -m service train`` of each stage in turn,
every rank recording, at every optimiser step, its trained parameters before the step, their
(all-reduced) gradients and the parameters after the step.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_steps.py OUT full,fusion FLAGS...

One gloo process group serves all the stages (``train`` uses a group it finds and leaves it
running), so the test pays for one start of the processes. Writes ``OUT/STAGE.rankR.pt``:
``{"code": exit code, "steps": [{"before": [...], "grad": [...], "after": [...]}, ...]}`` in the
order of ``StageModel.parameters``; rank 0 also writes the run directory ``OUT/STAGE``.
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


def main(argv: list[str]) -> int:
    out, stages, flags = Path(argv[0]), argv[1].split(","), argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for stage in stages:
        steps: list[dict[str, list[torch.Tensor]]] = []
        handles = record_steps(steps)
        try:
            code = cli(["train", "--stage", stage, *flags, "--output", str(out / stage)])
        finally:
            for handle in handles:
                handle.remove()
        torch.save({"code": code, "steps": steps}, out / f"{stage}.rank{rank}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
