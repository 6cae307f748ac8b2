"""Shared fixtures: seeded random-weight checkpoints in the real layouts, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from weight_files import (
    write_detector,
    write_fid_inception,
    write_mmagic,
    write_official,
    write_vgg16,
    write_zoo_model,
)

from models.pipeline import Colorizer
from models.precision import probe_cpu

TINY_WIDTH = 8  # structurally identical to the official nets (same keys), 1/64 of the compute


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skips: dict[str, pytest.MarkDecorator] = {}
    if not torch.cuda.is_available():
        skips["cuda"] = pytest.mark.skip(reason="needs a CUDA device")
    cpu = probe_cpu()  # the probe behind precision=auto (models/precision.py)
    if not cpu.native_bf16:
        skips["native_bf16"] = pytest.mark.skip(
            reason=f"this CPU ({cpu.capability}) has neither AMX nor AVX512-BF16, so "
            "precision=auto resolves to fp32 here: the bf16 path auto picks is not taken"
        )
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout folder (latest_net_{G,GF,GComp}.pth) of width-8 networks."""
    return write_official(tmp_path_factory.mktemp("checkpoints"), width=TINY_WIDTH, seed=0)


@pytest.fixture(scope="session")
def tiny_mmagic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmagic(tmp_path_factory.mktemp("mmagic") / "mmagic.pth", width=TINY_WIDTH, seed=0)


@pytest.fixture(scope="session")
def detector_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-weight torchvision Mask R-CNN v1 under torchvision's file name (about 170 MB)."""
    return write_detector(tmp_path_factory.mktemp("detector"), "v1")


@pytest.fixture(scope="session")
def vgg16_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random VGG16 features under torchvision's file name: the LPIPS backbone."""
    return write_vgg16(tmp_path_factory.mktemp("vgg16") / "vgg16-397923af.pth")


@pytest.fixture(scope="session")
def fid_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random FID Inception weights under pytorch-fid's file name."""
    return write_fid_inception(
        tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    )


@pytest.fixture(scope="session")
def zoo_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir as ``--weights-dir`` reads it: tiny InstColorization checkpoints in
    ``checkpoints/`` and seeded full-size Zhang ECCV16 and SIGGRAPH17 files in their folders."""
    root = tmp_path_factory.mktemp("weights")
    write_official(root / "checkpoints", width=TINY_WIDTH, seed=0)
    write_zoo_model(root, "zhang-eccv16", seed=1)
    write_zoo_model(root, "zhang-siggraph17", seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_colorizer(tiny_checkpoints: Path) -> Colorizer:
    """A CPU fp32 colorizer on the tiny checkpoints, without detector.

    fp32 pinned: tests compare it with command-line runs, which pass ``--precision fp32`` too
    (the command line's default ``auto`` is bf16 on a CPU with AMX or AVX512-BF16)."""
    return Colorizer.load(tiny_checkpoints, precision="fp32")


@pytest.fixture
def gray_photo() -> Image.Image:
    """A deterministic 8-bit grayscale picture with structure (gradient plus shapes)."""
    image = Image.linear_gradient("L").resize((320, 240))
    image.paste(40, (30, 40, 120, 200))
    image.paste(220, (200, 60, 300, 150))
    return image


@pytest.fixture(scope="session")
def larsson_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir with tiny InstColorization checkpoints and Larsson ECCV16 as a user gets it:
    seeded weights with the real channel counts in the Caffe HDF5 layout (about 590 MB),
    converted by the product's converter to ``larsson-eccv16/autocolorize.pth``."""
    from test_larsson_eccv16 import write_caffe_h5

    from models.larsson_eccv16 import convert_caffe_hdf5
    from models.registry import get_model

    root = tmp_path_factory.mktemp("larsson-weights")
    write_official(root / "checkpoints", width=TINY_WIDTH, seed=0)
    h5 = tmp_path_factory.mktemp("larsson-caffe") / "autocolorize.caffemodel.h5"
    write_caffe_h5(h5, seed=5)
    (path,) = get_model("larsson-eccv16").weight_paths(root)
    convert_caffe_hdf5(h5, path)
    h5.unlink()  # the converted file is what the product reads
    return root
