"""Seeded random-weight checkpoints written in the real file layouts, so the real loaders run.

Official layout: plain state dicts, G and GComp without a prefix, GF with ``module.`` keys, saved
in the legacy (pre-1.6, non-zip) serialization like the authors' files. MMagic layout: one file,
tensors under ``state_dict`` with per-network prefixes and seven bare single-layer modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from models.checkpoints import MMAGIC_FILENAME
from models.detector import DETECTOR_WEIGHTS, DetectorVersion, build_maskrcnn
from models.networks import FullImageGenerator, FusionGenerator, InstanceGenerator

BARE = ("model8up", "model9up", "model10up", "model3short8", "model2short9", "model1short10",
        "model_class")  # fmt: skip


def randomize(network: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-style weights and plausible BatchNorm statistics: activations stay in range."""
    generator = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=generator) * std + mean)

    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                normal(module.weight, (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    normal(module.bias, 0.05)
            elif isinstance(module, nn.BatchNorm2d):
                normal(module.weight, 0.1, 1.0)
                normal(module.bias, 0.1)
                normal(module.running_mean, 0.1)
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
                module.num_batches_tracked.fill_(1000)
    return network.state_dict()


def random_networks(width: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts for G, GF and GComp, keyed by official file name, keys without prefixes."""
    return {
        "latest_net_G.pth": randomize(InstanceGenerator(width), seed),
        "latest_net_GF.pth": randomize(FusionGenerator(width), seed + 1),
        "latest_net_GComp.pth": randomize(FullImageGenerator(width), seed + 2),
    }


def write_official(folder: Path, width: int = 8, seed: int = 0, legacy: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, state in random_networks(width, seed).items():
        if name == "latest_net_GF.pth":
            state = {f"module.{k}": v for k, v in state.items()}
        torch.save(state, folder / name, _use_new_zipfile_serialization=not legacy)
    return folder


def to_mmagic_key(key: str) -> str:
    for name in BARE:
        if key.startswith(f"{name}.0."):
            return f"{name}.{key.removeprefix(f'{name}.0.')}"
    return key


def write_mmagic(path: Path, width: int = 8, seed: int = 0) -> Path:
    prefixes = {
        "latest_net_G.pth": "instance_model.",
        "latest_net_GF.pth": "fusion_model.",
        "latest_net_GComp.pth": "image_model.",
    }
    state = {
        prefixes[name] + to_mmagic_key(k): v
        for name, sd in random_networks(width, seed).items()
        for k, v in sd.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": {"mmagic_version": "1.0"}, "state_dict": state}, path)
    return path


def write_detector(folder: Path, version: DetectorVersion = "v1", seed: int = 0) -> Path:
    """A randomly initialised Mask R-CNN saved under torchvision's own file name."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DETECTOR_WEIGHTS[version].filename
    torch.save(build_maskrcnn(version).state_dict(), path)
    return path


def write_vgg16(path: Path, seed: int = 0) -> Path:
    """Seeded random torchvision VGG16 ``features.*`` tensors (the part LPIPS uses, about 60 MB).

    The keys are those of torchvision's ``vgg16-397923af.pth``; the classifier is left out to keep
    the file small, and the loader does not need it.
    """
    torch.manual_seed(seed)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in state.items() if k.startswith("features.")}, path)
    return path


def write_fid_inception(path: Path, seed: int = 0) -> Path:
    """Seeded random weights for pytorch-fid's FID Inception, in its file's layout (about 95 MB).

    The network is built as ``pytorch_fid.inception.fid_inception_v3`` builds it (torchvision's
    Inception v3 with 1008 classes and the FID blocks), without the download.
    """
    from pytorch_fid import inception as fid

    torch.manual_seed(seed)
    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    randomize(net, seed)  # built with init_weights=False: every tensor is set here
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.01)
        net.fc.bias.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


__all__ = [
    "MMAGIC_FILENAME",
    "random_networks",
    "write_detector",
    "write_eccv16_release",
    "write_fid_inception",
    "write_mmagic",
    "write_official",
    "write_vgg16",
]


def write_zoo_model(weights_dir: Path, name: str, seed: int = 0) -> Path:
    """Seeded random weights for registry model ``name`` at ``<weights_dir>/<its folder>/<its
    official file name>``, in the layout of the authors' file (the networks' own state dicts:
    tests/test_zoo_models.py checks those layouts against the releases' code)."""
    from models.registry import get_model
    from models.zhang_eccv16 import ZhangECCV16

    spec = get_model(name)
    networks: dict[str, nn.Module] = {
        "zhang-eccv16": ZhangECCV16(),
        "zhang-siggraph17": FullImageGenerator(64),
    }
    if name not in networks:
        raise ValueError(f"no seeded writer for {name!r}")
    (path,) = spec.weight_paths(weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(randomize(networks[name], seed), path)
    return path


def write_eccv16_release(
    path: Path, seed: int = 0, logit_scale: float = 1.0, folded_temperature: float | None = None
) -> Path:
    """Seeded ``zhang-eccv16`` weights at ``path`` in the release's layout with what the real
    file holds in ``model_out``: the 313 bin centres / 110 (the grid rule's, in grid order).

    The last conv (``model8.6``, the 313 logits) is scaled by ``logit_scale`` (seeded logits of
    about unit spread give near-uniform bin distributions) and, with ``folded_temperature`` T, by
    1 / T too: a file whose plain softmax *is* the annealed mean at T of the unfolded one, as the
    Caffe deploy file's Scale layer (2.606 = 1 / 0.38) would be if folded into the weights."""
    from models.li_dcnn import grid_bin_centres
    from models.zhang_eccv16 import ZhangECCV16

    network = ZhangECCV16()
    state = randomize(network, seed)
    factor = logit_scale / (folded_temperature or 1.0)
    with torch.no_grad():
        state["model8.6.weight"].mul_(factor)
        state["model8.6.bias"].mul_(factor)
        state["model_out.weight"].copy_((grid_bin_centres().t() / 110.0)[:, :, None, None])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_li_dcnn(weights_dir: Path, seed: int = 0, num_classes: int = 91) -> Path:
    """Seeded random ``li-dcnn`` weights at ``<weights_dir>/li-dcnn/li_dcnn.pth`` (what ``train
    --model li-dcnn`` writes: the network's state dict), bin centres the grid rule's."""
    from models.li_dcnn import LiDCNN, grid_bin_centres, set_bin_centres
    from models.registry import get_model

    network = LiDCNN(num_classes)
    randomize(network, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Linear):
                std = (2.0 / module.in_features) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                module.bias.zero_()
    set_bin_centres(network, grid_bin_centres())
    (path,) = get_model("li-dcnn").weight_paths(weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return path


ZHAO_TINY = {"classes": 5, "generator_layers": 2, "generator_channels": 16, "divisor": 16}
"""A narrow zhao-pixelated (a 2-layer generator): the full-size one is tests/test_zhao_pixelated.py's."""


def write_zhao(weights_dir: Path, seed: int = 4) -> Path:
    """Seeded ``ZHAO_TINY`` zhao-pixelated weights at ``<weights_dir>/zhao-pixelated/<file>``, in
    the training's file layout (``save_zhao_pixelated``)."""
    from models.zhao_pixelated import FILENAME, ZhaoPixelated, save_zhao_pixelated

    torch.manual_seed(seed)
    path = weights_dir / "zhao-pixelated" / FILENAME
    save_zhao_pixelated(ZhaoPixelated(**ZHAO_TINY), path)
    return path
