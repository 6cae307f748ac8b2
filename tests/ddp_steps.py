"""Run under torchrun by tests/test_training.py: ``python -m service train`` of each stage in turn,
every rank recording its trained parameters after every optimiser step.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_steps.py OUT full,fusion FLAGS...

One gloo process group serves all the stages (``train`` uses a group it finds and leaves it
running), so the test pays for one start of the processes. Writes ``OUT/STAGE.rankR.pt``:
``{"code": exit code, "steps": [[parameter, ...] after step 1, ...]}``; rank 0 also writes the
run directory ``OUT/STAGE``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

from service.cli import main as cli


def record_steps(steps: list[list[torch.Tensor]]) -> Any:
    """A global optimiser hook appending a copy of the optimised parameters after each step."""

    def hook(optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
        steps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    return register_optimizer_step_post_hook(hook)


def main(argv: list[str]) -> int:
    out, stages, flags = Path(argv[0]), argv[1].split(","), argv[2:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for stage in stages:
        steps: list[list[torch.Tensor]] = []
        handle = record_steps(steps)
        try:
            code = cli(["train", "--stage", stage, *flags, "--output", str(out / stage)])
        finally:
            handle.remove()
        torch.save({"code": code, "steps": steps}, out / f"{stage}.rank{rank}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
