"""What each stage trains, built from an init (spec §6 table).

* ``full``: GComp (the full-image net) from the init's GComp; every parameter but the unused
  classification head (the loss is on the regression output ``model_out``; ``model_class`` is not
  even computed, spec §6 and §7 quirk 18); BatchNorm in train mode.
* ``instance``: G (the instance net) from the init's GComp, the stage-1 weights as in the paper,
  or from the init's G when the init is a previous ``instance`` run (continuing it); BN in train mode.
* ``fusion``: GF fine-tuned from the init's GF, weight generators included (the official files
  hold a trained GF); with ``fresh_fusion``, GF's trunk from the init's GComp and freshly
  initialised weight generators, as the paper. Only the 13 used weight generators, ``model10`` and
  ``model_out`` train; G and GComp are frozen; every net stays in eval mode (BN statistics frozen).

The other two networks are carried over from the init unchanged, so every run writes all three.

Hints (``hint_sample_p`` < 1, ``train --hint-sample-p``): while training, every network input
(the full image, and each crop) gets the authors' random ground-truth hints
(``models.hints.sample_hints``: a geometric number of patches of sides 1-9 holding the patch's
mean ab) in InstColorization's convention ([L, ab / 110, mask - 0.5]); validation stays
automatic. ``hint_sample_p`` = 1 (the default) is the released checkpoints' setting: no hints.

Exactly the trained parameters have ``requires_grad``: every other one, the class head included,
is frozen. DistributedDataParallel reduces the gradients of every parameter that requires one, so
a parameter the loss never reaches would leave its bucket waiting ("Expected to have finished
reduction in the prior iteration" at step 2, and no gradient averaged at step 1). Freezing them
keeps DDP's default ``find_unused_parameters=False`` (no graph walk per step) correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.checkpoints import ColorizationNetworks
from models.fusion import build_layout
from models.hints import hinted_input, sample_hints
from models.networks import (
    FUSION_LAYERS,
    FullImageGenerator,
    FusionGenerator,
    InstanceGenerator,
)
from models.preprocess import network_input
from training.data import Stage


@dataclass(frozen=True)
class StageDefaults:
    """The reference's settings for one stage (spec §6)."""

    lr: float
    epochs: int  # niter: epochs at the full learning rate
    decay_epochs: int  # niter_decay: epochs of linear decay to ~0
    batch_size: int
    bn_train: bool


STAGE_DEFAULTS: dict[Stage, StageDefaults] = {
    "full": StageDefaults(lr=5e-4, epochs=100, decay_epochs=50, batch_size=16, bn_train=True),
    "instance": StageDefaults(lr=5e-4, epochs=100, decay_epochs=50, batch_size=16, bn_train=True),
    "fusion": StageDefaults(lr=5e-5, epochs=10, decay_epochs=20, batch_size=1, bn_train=False),
}
ADAM_BETAS = (0.9, 0.999)
INIT_STD = 0.02


def lambda_lr(epochs: int, decay_epochs: int) -> Any:
    """The reference's "lambda" policy: constant for ``epochs``, then linear decay to ~0."""

    def factor(epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - epochs) / float(decay_epochs + 1)

    return factor


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """The reference's ``normal`` init: conv weights N(0, 0.02), biases 0 (BN: N(1, 0.02), 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * INIT_STD)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * INIT_STD + 1.0)
                m.bias.zero_()


class HintSampler:
    """Random ground-truth hints for the inputs of one stage (``sample_hints``), seeded; on
    only while training (``StageModel.set_mode``)."""

    def __init__(self, p: float, seed: int) -> None:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"hint_sample_p must be in (0, 1], got {p}")
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)
        self.active = False

    def network_input(self, l_norm: torch.Tensor, ab_norm: torch.Tensor | None) -> torch.Tensor:
        if not self.active or self.p >= 1.0 or ab_norm is None:
            return network_input(l_norm)
        hint, mask = sample_hints(ab_norm.to(l_norm.dtype), self.p, self.generator)
        return hinted_input(l_norm, hint, mask)


def _input(
    hints: HintSampler | None, l_norm: torch.Tensor, ab_norm: torch.Tensor | None
) -> torch.Tensor:
    return network_input(l_norm) if hints is None else hints.network_input(l_norm, ab_norm)


class FullImageStage(nn.Module):
    def __init__(self, net: FullImageGenerator, hints: HintSampler | None = None) -> None:
        super().__init__()
        self.net = net
        self.hints = hints

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(_input(self.hints, batch["l"], batch.get("ab")))


class InstanceStage(nn.Module):
    def __init__(self, net: InstanceGenerator, hints: HintSampler | None = None) -> None:
        super().__init__()
        self.net = net
        self.hints = hints

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.net(_input(self.hints, batch["l"], batch.get("ab")))[0]


class FusionStage(nn.Module):
    """G on every crop (frozen, no graph), then GF through the vectorised fusion of ``models``."""

    def __init__(
        self,
        instance: InstanceGenerator,
        fusion: FusionGenerator,
        hints: HintSampler | None = None,
    ) -> None:
        super().__init__()
        self.instance = instance
        self.net = fusion
        self.hints = hints

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            crops = _input(self.hints, batch["crops"], batch.get("crops_ab"))
            _, features = self.instance(crops)
        layout = build_layout(batch["box_info"], batch["l"].device)
        return self.net(_input(self.hints, batch["l"], batch.get("ab")), features, layout)


@dataclass
class StageModel:
    """The module a stage optimises, its trained parameters, and all three networks for saving."""

    stage: Stage
    module: nn.Module
    parameters: list[nn.Parameter]
    networks: ColorizationNetworks
    bn_train: bool
    hints: HintSampler | None = None

    def set_mode(self, training: bool) -> None:
        self.module.train(training and self.bn_train)
        if self.hints is not None:
            self.hints.active = training


def _trunk_parameters(net: nn.Module) -> list[nn.Parameter]:
    """Every parameter except the 529-bin classification head (never trained, spec §6)."""
    return [p for name, p in net.named_parameters() if not name.startswith("model_class.")]


def _copy_of(cls: type[nn.Module], source: nn.Module, width: int) -> Any:
    """A frozen copy: ``build_stage`` unfreezes what the stage trains."""
    net = cls(width)
    net.load_state_dict(source.state_dict(), strict=True)
    return net.requires_grad_(False)


def fresh_fusion_net(full_image: FullImageGenerator, width: int, seed: int) -> FusionGenerator:
    """GF with the trunk of GComp (the stage-1 net) and freshly initialised weight generators."""
    fusion = FusionGenerator(width).requires_grad_(False)
    missing, unexpected = fusion.load_state_dict(full_image.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith("weight_layer") for k in missing)
    generator = torch.Generator().manual_seed(seed)
    for weight_generator in fusion.weight_generators():
        init_weights(weight_generator, generator)
    return fusion


def build_stage(
    stage: Stage,
    init: ColorizationNetworks,
    *,
    init_stage: str | None = None,
    fresh_fusion: bool = False,
    seed: int = 0,
    hint_sample_p: float = 1.0,
    hint_seed: int | None = None,
) -> StageModel:
    """The trainable module of ``stage`` from the init's networks (see the module docstring)."""
    width = init.width
    hints = None
    if hint_sample_p < 1.0:  # each process its own hint stream (``hint_seed``: seed + rank)
        hints = HintSampler(hint_sample_p, seed if hint_seed is None else hint_seed)
    instance, fusion, full_image = init.instance, init.fusion, init.full_image
    for net in (instance, fusion, full_image):
        net.requires_grad_(False)
    module: nn.Module
    if stage == "full":
        full_image = _copy_of(FullImageGenerator, init.full_image, width)
        module = FullImageStage(full_image, hints)
        trained = _trunk_parameters(full_image)
    elif stage == "instance":
        source = init.instance if init_stage == "instance" else init.full_image
        instance = _copy_of(InstanceGenerator, source, width)
        module = InstanceStage(instance, hints)
        trained = _trunk_parameters(instance)
    else:
        if fresh_fusion:
            fusion = fresh_fusion_net(init.full_image, width, seed)
        else:
            fusion = _copy_of(FusionGenerator, init.fusion, width)
        module = FusionStage(instance, fusion, hints)
        trained = [
            p
            for name in (*FUSION_LAYERS.values(), "model10", "model_out")
            for p in fusion.get_submodule(name).parameters()
        ]
    for p in trained:
        p.requires_grad_(True)
    trained_ids = {id(p) for p in trained}
    assert all((id(p) in trained_ids) == p.requires_grad for p in module.parameters())
    networks = ColorizationNetworks(
        instance, fusion, full_image, init.layout, init.files, init.width, hints is not None
    )
    return StageModel(stage, module, trained, networks, STAGE_DEFAULTS[stage].bn_train, hints)
