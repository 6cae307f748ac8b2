"""docs/evaluation.md's "Table 1 for every model" command, taken from the page and run as written.

The command between ``<!-- table1:command -->`` markers is parsed with shlex and given to the
command line in-process; only its paths are pointed at a tiny COCO-like set: ``val2017/`` (three
colour photos), ``annotations/instances_val2017.json`` (their boxes), ``weights/`` (a weights dir
with tiny InstColorization checkpoints, a random Mask R-CNN under its torchvision name, seeded
full-size Zhang files, the converted seeded Larsson file) and ``weights/vgg16-397923af.pth``
(seeded VGG16 features). The run must score every photo and instance crop under every model named
in ``--compare``, each at the batch size its configuration gives. Larsson runs at its default 512
px (another size is refused at ``--resolution network``), one image per batch as the page says,
which keeps this test's peak memory to one Larsson image's.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from weight_files import write_detector

from models.registry import MODELS
from service.cli import main

pytestmark = pytest.mark.slow  # four models, LPIPS and a Mask R-CNN: minutes on 2 cores

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "evaluation.md"


def documented_command() -> list[str]:
    found = re.search(r"<!-- table1:command -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert found, "docs/evaluation.md has no table1:command block"
    words = shlex.split(found.group(1).replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "service"], words
    return words[3:]


def test_the_documented_table1_command_scores_every_model(
    zoo_weights: Path,
    larsson_weights: Path,
    vgg16_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = documented_command()
    # the protocol's settings, as the paper states them
    assert args[0] == "evaluate"
    assert args[args.index("--resolution") + 1] == "network"
    assert args[args.index("--precision") + 1] == "fp32"
    compare = args[args.index("--compare") + 1 :]
    flags = {e.split("=", 1)[0]: shlex.split(e.split("=", 1)[1]) for e in compare}
    models = {n: f[f.index("--model") + 1] if "--model" in f else "instcolor"
              for n, f in flags.items()}  # fmt: skip
    batch = int(args[args.index("--batch-size") + 1])
    batches = {n: int(f[f.index("--batch-size") + 1]) if "--batch-size" in f else batch
               for n, f in flags.items()}  # fmt: skip
    assert set(models.values()) == {"instcolor", "zhang-eccv16", "zhang-siggraph17",
                                    "larsson-eccv16"}  # fmt: skip
    assert batches[next(n for n, m in models.items() if m == "larsson-eccv16")] == 1
    monkeypatch.delenv("COLORIZE_LARSSON_SIZE", raising=False)  # the default 512, as documented
    assert set(models.values()) <= set(MODELS)

    monkeypatch.chdir(tmp_path)  # the command's relative paths, laid out as the page says
    weights = tmp_path / "weights"
    weights.mkdir()
    for entry in zoo_weights.iterdir():
        (weights / entry.name).symlink_to(entry)
    (weights / "larsson-eccv16").symlink_to(larsson_weights / "larsson-eccv16")
    write_detector(weights)
    (weights / "vgg16-397923af.pth").symlink_to(vgg16_weights)
    photos = tmp_path / "val2017"
    photos.mkdir()
    rng = np.random.default_rng(3)
    sizes = {
        "000000000139.jpg": (96, 64),
        "000000000285.jpg": (64, 80),
        "000000000632.jpg": (72, 72),
    }
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / name)
    images = [{"id": i, "file_name": n, "width": w, "height": h}
              for i, (n, (w, h)) in enumerate(sizes.items(), 1)]  # fmt: skip
    boxes = [{"id": 100 + i, "image_id": i, "bbox": [4, 4, 40, 30], "category_id": 1, "iscrowd": 0}
             for i in (1, 2, 3)]  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps(
            {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "person"}]}
        )
    )

    assert main([*args, "--no-progress"]) == 0
    report = tmp_path / args[args.index("--output") + 1]
    comparison = json.loads((report / "comparison.json").read_text())
    for metric in ("lpips", "psnr", "ssim"):
        assert {r["name"] for r in comparison["metrics"][metric]["rows"]} == set(models)
    versions = set()
    for name, model in models.items():
        summary = json.loads((report / name / "summary.json").read_text())
        assert summary["config"]["model"] == model
        assert summary["config"]["batch_size"] == batches[name]
        versions.add(summary["model_version"])
        for metric in ("lpips", "psnr", "ssim"):
            assert summary["metrics"][metric]["count"] == 3, (name, metric)
            assert summary["instances"]["metrics"][metric]["count"] == 3, (name, metric)
        scored = Image.open(report / name / "images" / "000000000139.png")
        assert scored.size == (256, 256)
    assert len(versions) == len(models)
