"""A training command stopped by SIGTERM once it is under way (tests of the save-and-exit path)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sigterm_once_training(argv: list[str], marker: str, timeout: float = 120) -> tuple[int, str]:
    """Run ``python ARGV`` in the repository (one torch thread), send SIGTERM after the first
    output line containing ``marker`` (a logged step: training is under way), and return the exit
    code and the output that followed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if marker in line:
                break
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=timeout)[0]
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, rest
