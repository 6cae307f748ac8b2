"""The three colorization networks with the reference's module names (spec §2, Appendix A).

GComp (:class:`FullImageGenerator`), G (:class:`InstanceGenerator`) and GF
(:class:`FusionGenerator`) share one trunk. Attribute names *and* Sequential indices match the
authors' files, so their state dicts load strictly. ``width`` is the trunk's first channel count
(64 in every official file); smaller widths give structurally identical nets for fast tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.fusion import FusionLayout, fuse_instances

FEATURE_NAMES: tuple[str, ...] = (
    "conv1_2",
    "conv2_2",
    "conv3_3",
    "conv4_3",
    "conv5_3",
    "conv6_3",
    "conv7_3",
    "conv8_up",
    "conv8_3",
    "conv9_up",
    "conv9_3",
    "conv10_up",
    "conv10_2",
)
"""The 13 trunk features that GF fuses with the instance features, in forward order."""

FUSION_LAYERS: dict[str, str] = {
    "conv1_2": "weight_layer",
    "conv2_2": "weight_layer2",
    "conv3_3": "weight_layer3",
    "conv4_3": "weight_layer4",
    "conv5_3": "weight_layer5",
    "conv6_3": "weight_layer6",
    "conv7_3": "weight_layer7",
    "conv8_up": "weight_layer8_1",
    "conv8_3": "weight_layer8_2",
    "conv9_up": "weight_layer9_1",
    "conv9_3": "weight_layer9_2",
    "conv10_up": "weight_layer10_1",
    "conv10_2": "weight_layer10_2",
}

NUM_AB_CLASSES = 529  # 23 x 23 ab bins of the unused classification head
WEIGHT_GENERATOR_HIDDEN = 16

FuseFn = Callable[[str, torch.Tensor], torch.Tensor]


def _conv(c_in: int, c_out: int, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=1, padding=dilation, dilation=dilation, bias=True)


def _block(c_in: int, c_out: int, convs: int, dilation: int = 1) -> nn.Sequential:
    """conv -> ReLU repeated, then BatchNorm: the reference puts BN after the activation."""
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [_conv(c_in if i == 0 else c_out, c_out, dilation), nn.ReLU()]
    layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers)


class ColorizationTrunk(nn.Module):
    """The SIGGRAPH 2017 U-Net trunk shared by GComp, G and GF (spec §2.1)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        self.width = width
        self.model1 = _block(4, c1, 2)
        self.model2 = _block(c1, c2, 2)
        self.model3 = _block(c2, c3, 3)
        self.model4 = _block(c3, c4, 3)
        self.model5 = _block(c4, c4, 3, dilation=2)
        self.model6 = _block(c4, c4, 3, dilation=2)
        self.model7 = _block(c4, c4, 3)
        self.model8up = nn.Sequential(nn.ConvTranspose2d(c4, c3, 4, stride=2, padding=1))
        self.model3short8 = nn.Sequential(_conv(c3, c3))
        self.model8 = nn.Sequential(
            nn.ReLU(), _conv(c3, c3), nn.ReLU(), _conv(c3, c3), nn.ReLU(), nn.BatchNorm2d(c3)
        )
        self.model9up = nn.Sequential(nn.ConvTranspose2d(c3, c2, 4, stride=2, padding=1))
        self.model2short9 = nn.Sequential(_conv(c2, c2))
        self.model9 = nn.Sequential(nn.ReLU(), _conv(c2, c2), nn.ReLU(), nn.BatchNorm2d(c2))
        self.model10up = nn.Sequential(nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1))
        self.model1short10 = nn.Sequential(_conv(c1, c2))
        self.model10 = nn.Sequential(nn.ReLU(), _conv(c2, c2), nn.LeakyReLU(negative_slope=0.2))
        # The 529-bin classification head exists for strict loading; its output is never used at
        # inference, so forward() skips it (spec §7 quirk 18).
        self.model_class = nn.Sequential(nn.Conv2d(c3, NUM_AB_CLASSES, 1))
        self.model_out = nn.Sequential(nn.Conv2d(c2, 2, 1), nn.Tanh())

    def run(
        self, x: torch.Tensor, fuse: FuseFn | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return normalised ab and the 13 features; ``fuse(name, feature)`` may replace each one.

        The ``*_up`` entries of the returned dict are rectified, as the reference's in-place ReLU
        leaves them (spec §2.3); ``fuse`` sees them before rectification.
        """
        hook: FuseFn = fuse if fuse is not None else (lambda _name, f: f)
        feats: dict[str, torch.Tensor] = {}

        def point(name: str, value: torch.Tensor) -> torch.Tensor:
            value = hook(name, value)
            feats[name] = value
            return value

        conv1_2 = point("conv1_2", self.model1(x))
        conv2_2 = point("conv2_2", self.model2(conv1_2[:, :, ::2, ::2]))
        conv3_3 = point("conv3_3", self.model3(conv2_2[:, :, ::2, ::2]))
        conv4_3 = point("conv4_3", self.model4(conv3_3[:, :, ::2, ::2]))
        conv5_3 = point("conv5_3", self.model5(conv4_3))
        conv6_3 = point("conv6_3", self.model6(conv5_3))
        conv7_3 = point("conv7_3", self.model7(conv6_3))
        conv8_up = point("conv8_up", self.model8up(conv7_3) + self.model3short8(conv3_3))
        conv8_3 = point("conv8_3", self.model8(conv8_up))
        conv9_up = point("conv9_up", self.model9up(conv8_3) + self.model2short9(conv2_2))
        conv9_3 = point("conv9_3", self.model9(conv9_up))
        conv10_up = point("conv10_up", self.model10up(conv9_3) + self.model1short10(conv1_2))
        conv10_2 = point("conv10_2", self.model10(conv10_up))
        out = self.model_out(conv10_2)
        for name in ("conv8_up", "conv9_up", "conv10_up"):
            feats[name] = torch.relu(feats[name])
        return out, feats


class FullImageGenerator(ColorizationTrunk):
    """GComp (reference ``SIGGRAPHGenerator``): the full image alone, used when there are no boxes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class InstanceGenerator(ColorizationTrunk):
    """G: runs on the instance crops; returns ab and the features GF fuses."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.run(x)


def _weight_branch(channels: int) -> nn.Sequential:
    h = WEIGHT_GENERATOR_HIDDEN
    return nn.Sequential(
        nn.Conv2d(channels, h, 3, padding=1), nn.ReLU(),
        nn.Conv2d(h, h, 3, padding=1), nn.ReLU(),
        nn.Conv2d(h, 1, 3, padding=1), nn.ReLU(),
    )  # fmt: skip


class WeightGenerator(nn.Module):
    """Per-pixel fusion logits for the instance and the full-image (background) features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.simple_instance_conv = _weight_branch(channels)
        self.simple_bg_conv = _weight_branch(channels)


class FusionGenerator(ColorizationTrunk):
    """GF: the full-image trunk that blends in instance features at 13 points (spec §4)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__(width)
        c1, c2, c3, c4 = width, 2 * width, 4 * width, 8 * width
        channels = {
            "weight_layer": c1, "weight_layer2": c2, "weight_layer3": c3,
            "weight_layer4": c4, "weight_layer5": c4, "weight_layer6": c4, "weight_layer7": c4,
            "weight_layer8_1": c3, "weight_layer8_2": c3, "weight_layer9_1": c2,
            "weight_layer9_2": c2, "weight_layer10_1": c2, "weight_layer10_2": c2,
            "weight_layerout": 2,  # defined by the reference, never called (spec §4.5)
        }  # fmt: skip
        for name, c in channels.items():
            self.add_module(name, WeightGenerator(c))

    def forward(
        self,
        x: torch.Tensor,
        instance_features: dict[str, torch.Tensor],
        layout: FusionLayout,
    ) -> torch.Tensor:
        def fuse(name: str, feature: torch.Tensor) -> torch.Tensor:
            generator = self.get_submodule(FUSION_LAYERS[name])
            assert isinstance(generator, WeightGenerator)
            return fuse_instances(
                feature,
                instance_features[name],
                generator.simple_instance_conv,
                generator.simple_bg_conv,
                layout,
            )

        return self.run(x, fuse)[0]

    def weight_generators(self) -> list[nn.Module]:
        return [self.get_submodule(name) for name in (*FUSION_LAYERS.values(), "weight_layerout")]
