"""``loadtests/measure_eccv16_temperature.py`` on seeded files in the release's layout: it reports
the convention each file was built with.

The data are drawn from the seeded network itself: each 4x4 block's ab is a bin centre sampled
from softmax(z) of the *unfolded* file, so that file is calibrated by construction (tau* = 1),
and the same network with the paper's 1 / 0.38 folded into its last conv has tau* = 2.63.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from weight_files import write_eccv16_release

from models.lab import AB_NORM
from models.zhang_eccv16 import PAPER_TEMPERATURE, load_zhang_eccv16

SCRIPT = Path(__file__).resolve().parent.parent / "loadtests" / "measure_eccv16_temperature.py"
LOGIT_SCALE = 3.0


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def files_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("eccv16-conventions")
    plain = write_eccv16_release(root / "plain" / "release.pth", seed=3, logit_scale=LOGIT_SCALE)
    folded = write_eccv16_release(
        root / "folded" / "release.pth",
        seed=3,
        logit_scale=LOGIT_SCALE,
        folded_temperature=PAPER_TEMPERATURE,
    )
    generator = torch.Generator().manual_seed(11)
    ramp = torch.linspace(10.0, 90.0, 256).view(1, 1, 256).expand(4, 256, 256)
    lightness = (ramp + 8 * torch.randn((4, 256, 256), generator=generator)).clamp(0.0, 100.0)
    network = load_zhang_eccv16(plain)
    with torch.inference_mode():
        z = network.logits((lightness[:, None] - 50.0) / 100.0)  # (4, 313, 64, 64)
        p = torch.softmax(z.double(), dim=1).permute(0, 2, 3, 1).reshape(-1, 313)
        drawn = torch.multinomial(p, 1, generator=generator)[:, 0]
        centres = network.model_out.weight[:, :, 0, 0].t() * AB_NORM  # (313, 2)
        ab = centres[drawn].view(4, 64, 64, 2).permute(0, 3, 1, 2)
        ab = ab.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # each block one centre
    data = root / "drawn.npz"
    np.savez(data, L=lightness.numpy(), ab=ab.numpy())
    return plain, folded, data


@pytest.mark.parametrize(("which", "convention", "tau"), [(0, "plain", 1.0), (1, "folded", 2.63)])
def test_the_script_reports_the_convention_the_file_was_built_with(
    files_and_data: tuple[Path, Path, Path], which: int, convention: str, tau: float
) -> None:
    path, data = files_and_data[which], files_and_data[2]
    done = run_script(str(path), "--lab", str(data), "--json")
    assert done.returncode == 0, done.stderr
    text, line = done.stdout.rstrip("\n").rsplit("\n", 1)
    result = json.loads(line)
    assert result["convention"] == convention
    assert result["nll_optimal_temperature"] == pytest.approx(tau, rel=0.1)
    decoding = result["decoding_layer"]
    assert decoding["plain_expectation"] and decoding["distinct_centres"] == 313
    assert result["official_file"] is False and result["images_used"] == 4
    assert f"convention: {convention.upper()}" in text


def test_the_script_says_the_real_file_is_needed(tmp_path: Path) -> None:
    done = run_script(str(tmp_path / "colorization_release_v2-9b330a0b.pth"), "--images", "x")
    assert done.returncode == 2
    assert "not found" in done.stderr and "cannot be downloaded here" in done.stderr
    assert "fetch-weights --model zhang-eccv16" in done.stderr


def test_the_script_reads_a_folder_of_photos_and_leaves_grey_ones_out(
    files_and_data: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for name in ("a.png", "b.jpg"):
        colour = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
        Image.fromarray(colour).save(tmp_path / name)
    Image.new("RGB", (50, 50), (128, 128, 128)).save(tmp_path / "grey.png")
    done = run_script(str(files_and_data[0]), "--images", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.rstrip("\n").rsplit("\n", 1)[1])
    assert (result["images_used"], result["images_grey_left_out"]) == (2, 1)
    assert result["pixels"] == 2 * 64 * 64
    assert result["decoding_layer"]["plain_expectation"]
