"""`bash loadtests/gpu_check.sh --quick` on the CPU: every section of its summary has figures.

About 2 minutes of CPU time (7 minutes wall on the shared 2-core dev box): marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SECTIONS = [
    "## precision vs fp32",
    "## detector box IoU vs fp32",
    "## pipeline images/s",
    "## offline runner: sequential vs overlapped",
    "## HTTP through serve",
    "## training images/s per stage",
    "## torchrun, 2 processes, each stage",
    "## torchrun, 2 processes, paper models",
]


@pytest.mark.slow
def test_quick_gpu_check_prints_every_section_with_figures(tmp_path: Path) -> None:
    summary, bench = tmp_path / "summary.md", tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "loadtests/gpu_check.sh", "--quick", "--summary", str(summary),
         "--benchmarks", str(bench)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = summary.read_text()
    assert "- machine: CPU" in text and "torch " in text
    parts = re.split(r"^## ", text, flags=re.M)
    bodies = {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts[1:]}
    for section in SECTIONS:
        title = next((t for t in bodies if t.startswith(section[3:])), None)
        assert title is not None, f"{section} missing:\n{text}"
        body = bodies[title]
        assert "exit 0" in body or "torchrun" in section, body
        assert re.search(r"\d+\.\d+", body) or "ranks equal True" in body, body
    for stage in ("full", "instance", "fusion"):
        assert re.search(
            rf"\| {stage} \| gloo x2 on cpu \| exit 0 \| steps 2 \| ranks equal True", text
        )
    for model in ("li-dcnn", "zhao-pixelated"):
        assert re.search(
            rf"\| {model} \| gloo x2 on cpu \| exit 0 \| steps 2 \| ranks equal True \| "
            r"validations 2 of 2 images",
            text,
        ), text
    assert "## gpu_check.sh summary" in bench.read_text()
