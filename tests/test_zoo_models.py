"""Zhang ECCV16 and SIGGRAPH17: strict loading of the official layouts and numerical faithfulness.

The expected values come from this file's own transcription of the authors' PyTorch release
(``colorizers/eccv16.py``, ``siggraph17.py`` and ``base_color.py`` of richzhang/colorization):
the same ``nn.Sequential`` lists line by line, in-place ReLUs included, and the release's forward.
Seeded random weights are drawn into those transcriptions, saved with ``torch.save`` (so the key
names and shapes are the release's, derived independently of the product), loaded by the product's
real loader, and the product's ``predict_ab`` is compared with the transcription's forward, as ab
and as 8-bit RGB through the NumPy Lab of ``reference_impl`` (within 1 LSB, fp32, CPU).

The networks are full size; inputs are 64x64 (every size that is a multiple of 8 runs the same
layers) so the file stays fast on two CPU cores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from reference_impl import np_lab_norm2rgb, np_to_uint8

from models.checkpoints import CheckpointError
from models.networks import FullImageGenerator
from models.registry import (
    DEFAULT_MODEL,
    MODELS,
    AutomaticColorizer,
    UnknownModelError,
    get_model,
)
from models.zhang_eccv16 import ZhangECCV16, load_zhang_eccv16
from models.zhang_siggraph17 import ZhangSIGGRAPH17, load_zhang_siggraph17

ECCV16_FILE = "colorization_release_v2-9b330a0b.pth"
SIGGRAPH17_FILE = "siggraph17-df00044c.pth"
SIZE = 64
BATCH = 2

# -- the authors' release, transcribed -----------------------------------------------------------


class BaseColor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l_cent = 50.0
        self.l_norm = 100.0
        self.ab_norm = 110.0

    def normalize_l(self, in_l: torch.Tensor) -> torch.Tensor:
        return (in_l - self.l_cent) / self.l_norm

    def normalize_ab(self, in_ab: torch.Tensor) -> torch.Tensor:
        return in_ab / self.ab_norm

    def unnormalize_ab(self, in_ab: torch.Tensor) -> torch.Tensor:
        return in_ab * self.ab_norm


class ECCVGenerator(BaseColor):
    def __init__(self, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        model1: list[nn.Module] = [nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=True)]
        model1 += [nn.ReLU(True)]
        model1 += [nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1, bias=True)]
        model1 += [nn.ReLU(True)]
        model1 += [norm_layer(64)]

        model2: list[nn.Module] = [
            nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model2 += [nn.ReLU(True)]
        model2 += [nn.Conv2d(128, 128, kernel_size=3, stride=2, padding=1, bias=True)]
        model2 += [nn.ReLU(True)]
        model2 += [norm_layer(128)]

        model3: list[nn.Module] = [
            nn.Conv2d(128, 256, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model3 += [nn.ReLU(True)]
        model3 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model3 += [nn.ReLU(True)]
        model3 += [nn.Conv2d(256, 256, kernel_size=3, stride=2, padding=1, bias=True)]
        model3 += [nn.ReLU(True)]
        model3 += [norm_layer(256)]

        model4: list[nn.Module] = [
            nn.Conv2d(256, 512, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model4 += [nn.ReLU(True)]
        model4 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model4 += [nn.ReLU(True)]
        model4 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model4 += [nn.ReLU(True)]
        model4 += [norm_layer(512)]

        model5: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)
        ]
        model5 += [nn.ReLU(True)]
        model5 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model5 += [nn.ReLU(True)]
        model5 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model5 += [nn.ReLU(True)]
        model5 += [norm_layer(512)]

        model6: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)
        ]
        model6 += [nn.ReLU(True)]
        model6 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model6 += [nn.ReLU(True)]
        model6 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model6 += [nn.ReLU(True)]
        model6 += [norm_layer(512)]

        model7: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model7 += [nn.ReLU(True)]
        model7 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model7 += [nn.ReLU(True)]
        model7 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model7 += [nn.ReLU(True)]
        model7 += [norm_layer(512)]

        model8: list[nn.Module] = [
            nn.ConvTranspose2d(512, 256, kernel_size=4, stride=2, padding=1, bias=True)
        ]
        model8 += [nn.ReLU(True)]
        model8 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model8 += [nn.ReLU(True)]
        model8 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model8 += [nn.ReLU(True)]

        model8 += [nn.Conv2d(256, 313, kernel_size=1, stride=1, padding=0, bias=True)]

        self.model1 = nn.Sequential(*model1)
        self.model2 = nn.Sequential(*model2)
        self.model3 = nn.Sequential(*model3)
        self.model4 = nn.Sequential(*model4)
        self.model5 = nn.Sequential(*model5)
        self.model6 = nn.Sequential(*model6)
        self.model7 = nn.Sequential(*model7)
        self.model8 = nn.Sequential(*model8)

        self.softmax = nn.Softmax(dim=1)
        self.model_out = nn.Conv2d(
            313, 2, kernel_size=1, padding=0, dilation=1, stride=1, bias=False
        )
        self.upsample4 = nn.Upsample(scale_factor=4, mode="bilinear")

    def conv8_3(self, input_l: torch.Tensor) -> torch.Tensor:
        conv1_2 = self.model1(self.normalize_l(input_l))
        conv2_2 = self.model2(conv1_2)
        conv3_3 = self.model3(conv2_2)
        conv4_3 = self.model4(conv3_3)
        conv5_3 = self.model5(conv4_3)
        conv6_3 = self.model6(conv5_3)
        conv7_3 = self.model7(conv6_3)
        return self.model8(conv7_3)

    def forward(self, input_l: torch.Tensor) -> torch.Tensor:
        out_reg = self.model_out(self.softmax(self.conv8_3(input_l)))
        return self.unnormalize_ab(self.upsample4(out_reg))


class SIGGRAPHGenerator(BaseColor):
    def __init__(self, norm_layer: type[nn.Module] = nn.BatchNorm2d, classes: int = 529) -> None:
        super().__init__()
        # Conv1
        model1: list[nn.Module] = [nn.Conv2d(4, 64, kernel_size=3, stride=1, padding=1, bias=True)]
        model1 += [nn.ReLU(True)]
        model1 += [nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1, bias=True)]
        model1 += [nn.ReLU(True)]
        model1 += [norm_layer(64)]
        # add a subsampling operation

        # Conv2
        model2: list[nn.Module] = [
            nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model2 += [nn.ReLU(True)]
        model2 += [nn.Conv2d(128, 128, kernel_size=3, stride=1, padding=1, bias=True)]
        model2 += [nn.ReLU(True)]
        model2 += [norm_layer(128)]
        # add a subsampling layer operation

        # Conv3
        model3: list[nn.Module] = [
            nn.Conv2d(128, 256, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model3 += [nn.ReLU(True)]
        model3 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model3 += [nn.ReLU(True)]
        model3 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model3 += [nn.ReLU(True)]
        model3 += [norm_layer(256)]
        # add a subsampling layer operation

        # Conv4
        model4: list[nn.Module] = [
            nn.Conv2d(256, 512, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model4 += [nn.ReLU(True)]
        model4 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model4 += [nn.ReLU(True)]
        model4 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model4 += [nn.ReLU(True)]
        model4 += [norm_layer(512)]

        # Conv5
        model5: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)
        ]
        model5 += [nn.ReLU(True)]
        model5 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model5 += [nn.ReLU(True)]
        model5 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model5 += [nn.ReLU(True)]
        model5 += [norm_layer(512)]

        # Conv6
        model6: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)
        ]
        model6 += [nn.ReLU(True)]
        model6 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model6 += [nn.ReLU(True)]
        model6 += [nn.Conv2d(512, 512, kernel_size=3, dilation=2, stride=1, padding=2, bias=True)]
        model6 += [nn.ReLU(True)]
        model6 += [norm_layer(512)]

        # Conv7
        model7: list[nn.Module] = [
            nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        model7 += [nn.ReLU(True)]
        model7 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model7 += [nn.ReLU(True)]
        model7 += [nn.Conv2d(512, 512, kernel_size=3, stride=1, padding=1, bias=True)]
        model7 += [nn.ReLU(True)]
        model7 += [norm_layer(512)]

        # Conv7
        model8up: list[nn.Module] = [
            nn.ConvTranspose2d(512, 256, kernel_size=4, stride=2, padding=1, bias=True)
        ]
        model3short8: list[nn.Module] = [
            nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)
        ]

        model8: list[nn.Module] = [nn.ReLU(True)]
        model8 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model8 += [nn.ReLU(True)]
        model8 += [nn.Conv2d(256, 256, kernel_size=3, stride=1, padding=1, bias=True)]
        model8 += [nn.ReLU(True)]
        model8 += [norm_layer(256)]

        # Conv9
        model9up: list[nn.Module] = [
            nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1, bias=True)
        ]
        model2short9: list[nn.Module] = [
            nn.Conv2d(128, 128, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        # add the two feature maps above

        model9: list[nn.Module] = [nn.ReLU(True)]
        model9 += [nn.Conv2d(128, 128, kernel_size=3, stride=1, padding=1, bias=True)]
        model9 += [nn.ReLU(True)]
        model9 += [norm_layer(128)]

        # Conv10
        model10up: list[nn.Module] = [
            nn.ConvTranspose2d(128, 128, kernel_size=4, stride=2, padding=1, bias=True)
        ]
        model1short10: list[nn.Module] = [
            nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1, bias=True)
        ]
        # add the two feature maps above

        model10: list[nn.Module] = [nn.ReLU(True)]
        model10 += [nn.Conv2d(128, 128, kernel_size=3, dilation=1, stride=1, padding=1, bias=True)]
        model10 += [nn.LeakyReLU(negative_slope=0.2)]

        # classification output
        model_class: list[nn.Module] = [
            nn.Conv2d(256, classes, kernel_size=1, padding=0, dilation=1, stride=1, bias=True)
        ]

        # regression output
        model_out: list[nn.Module] = [
            nn.Conv2d(128, 2, kernel_size=1, padding=0, dilation=1, stride=1, bias=True)
        ]
        model_out += [nn.Tanh()]

        self.model1 = nn.Sequential(*model1)
        self.model2 = nn.Sequential(*model2)
        self.model3 = nn.Sequential(*model3)
        self.model4 = nn.Sequential(*model4)
        self.model5 = nn.Sequential(*model5)
        self.model6 = nn.Sequential(*model6)
        self.model7 = nn.Sequential(*model7)
        self.model8up = nn.Sequential(*model8up)
        self.model8 = nn.Sequential(*model8)
        self.model9up = nn.Sequential(*model9up)
        self.model9 = nn.Sequential(*model9)
        self.model10up = nn.Sequential(*model10up)
        self.model10 = nn.Sequential(*model10)
        self.model3short8 = nn.Sequential(*model3short8)
        self.model2short9 = nn.Sequential(*model2short9)
        self.model1short10 = nn.Sequential(*model1short10)

        self.model_class = nn.Sequential(*model_class)
        self.model_out = nn.Sequential(*model_out)

        self.upsample4 = nn.Sequential(nn.Upsample(scale_factor=4, mode="bilinear"))
        self.softmax = nn.Sequential(nn.Softmax(dim=1))

    def forward(
        self,
        input_A: torch.Tensor,
        input_B: torch.Tensor | None = None,
        mask_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_B is None:
            input_B = torch.cat((input_A * 0, input_A * 0), dim=1)
        if mask_B is None:
            mask_B = input_A * 0

        conv1_2 = self.model1(
            torch.cat((self.normalize_l(input_A), self.normalize_ab(input_B), mask_B), dim=1)
        )
        conv2_2 = self.model2(conv1_2[:, :, ::2, ::2])
        conv3_3 = self.model3(conv2_2[:, :, ::2, ::2])
        conv4_3 = self.model4(conv3_3[:, :, ::2, ::2])
        conv5_3 = self.model5(conv4_3)
        conv6_3 = self.model6(conv5_3)
        conv7_3 = self.model7(conv6_3)

        conv8_up = self.model8up(conv7_3) + self.model3short8(conv3_3)
        conv8_3 = self.model8(conv8_up)
        conv9_up = self.model9up(conv8_3) + self.model2short9(conv2_2)
        conv9_3 = self.model9(conv9_up)
        conv10_up = self.model10up(conv9_3) + self.model1short10(conv1_2)
        conv10_2 = self.model10(conv10_up)
        out_reg = self.model_out(conv10_2)

        return self.unnormalize_ab(out_reg)


# -- seeded weights in the official layout ---------------------------------------------------------


def seeded(network: nn.Module, seed: int) -> nn.Module:
    """He-style conv weights, plausible BatchNorm statistics; ``model_out`` of ECCV16 as ab bins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=g) * (2 / fan_in) ** 0.5
                )
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.05)
                if module.out_channels == 313:  # ECCV16 logits: confident, like a trained net
                    module.weight.mul_(10.0)
                if name == "model_out" and module.bias is None:  # ECCV16: bin centres / 110
                    module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 1.8 - 0.9)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                module.num_batches_tracked.fill_(1000)
    return network.eval()


def lightness(seed: int, n: int = BATCH, size: int = SIZE) -> torch.Tensor:
    """Smooth L in [0, 100] with some texture: a gradient plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(5.0, 95.0, size).view(1, 1, 1, size).expand(n, 1, size, size)
    return (ramp + 10 * torch.randn((n, 1, size, size), generator=g)).clamp(0.0, 100.0)


def rgb8(lab_l: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
    """(N,1,H,W) L and (N,2,H,W) ab -> (N,3,H,W) uint8 through reference_impl's NumPy Lab."""
    out = []
    for i in range(lab_l.shape[0]):
        l_norm = ((lab_l[i] - 50.0) / 100.0).numpy().astype(np.float32)
        ab_norm = (ab[i] / 110.0).numpy().astype(np.float32)
        out.append(np_to_uint8(np_lab_norm2rgb(l_norm, ab_norm)))
    return np.stack(out)


def assert_same_colours(lab_l: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    diff = np.abs(rgb8(lab_l, got).astype(int) - rgb8(lab_l, want).astype(int))
    assert diff.max() <= 1, f"RGB differs by {diff.max()} LSB"
    # The RGB comparison is not vacuous: the expected colours are far from grey.
    assert want.abs().max() > 5.0


@pytest.fixture(scope="module")
def eccv16_reference() -> ECCVGenerator:
    return seeded(ECCVGenerator(), seed=16)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def eccv16_file(tmp_path_factory: pytest.TempPathFactory, eccv16_reference: nn.Module) -> Path:
    path = tmp_path_factory.mktemp("zhang-eccv16") / ECCV16_FILE
    torch.save(eccv16_reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def siggraph17_reference() -> SIGGRAPHGenerator:
    return seeded(SIGGRAPHGenerator(), seed=17)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def siggraph17_file(
    tmp_path_factory: pytest.TempPathFactory, siggraph17_reference: nn.Module
) -> Path:
    path = tmp_path_factory.mktemp("zhang-siggraph17") / SIGGRAPH17_FILE
    torch.save(siggraph17_reference.state_dict(), path)
    return path


# -- the official layouts --------------------------------------------------------------------------


def test_eccv16_layout_is_the_release(eccv16_reference: nn.Module) -> None:
    state = eccv16_reference.state_dict()
    assert len(state) == 82
    params = sum(p.numel() for p in eccv16_reference.parameters())
    assert round(params / 1e6, 1) == 32.2
    product = ZhangECCV16()
    assert {k: v.shape for k, v in product.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    assert sum(p.numel() for p in product.parameters()) == params


def test_siggraph17_layout_is_the_release(siggraph17_reference: nn.Module) -> None:
    state = siggraph17_reference.state_dict()
    assert len(state) == 107
    product = ZhangSIGGRAPH17().generator
    assert {k: v.shape for k, v in product.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }


# -- faithfulness ----------------------------------------------------------------------------------


@pytest.mark.slow
@torch.inference_mode()
def test_eccv16_matches_the_release(eccv16_file: Path, eccv16_reference: ECCVGenerator) -> None:
    model = load_zhang_eccv16(eccv16_file)
    assert not model.training
    lab_l = lightness(seed=1)
    got = model.predict_ab(lab_l)  # one batch of two
    want = torch.cat([eccv16_reference(lab_l[i : i + 1]) for i in range(BATCH)])  # one by one
    assert got.shape == (BATCH, 2, SIZE, SIZE)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert_same_colours(lab_l, got, want)


def annealed_mean(reference: ECCVGenerator, logits: torch.Tensor, t: float) -> torch.Tensor:
    """The paper's rule written out: softmax(z / T) as exp / sum, bin-centre expectation, x4, x110."""
    z = logits.double() / t
    p = torch.exp(z - z.amax(dim=1, keepdim=True))
    p = p / p.sum(dim=1, keepdim=True)
    centres = reference.model_out.weight[:, :, 0, 0].double()  # (2, 313)
    ab = torch.einsum("cq,nqhw->nchw", centres, p)
    return reference.upsample4(ab.float()) * 110.0


@pytest.mark.slow
@torch.inference_mode()
def test_eccv16_temperature_is_softmax_of_z_over_t(
    eccv16_file: Path, eccv16_reference: ECCVGenerator
) -> None:
    lab_l = lightness(seed=2, n=1)
    model = load_zhang_eccv16(eccv16_file)
    logits = eccv16_reference.conv8_3(lab_l)
    release = model.decode(logits)  # default T = 1
    paper = model.decode(logits, temperature=0.38)
    torch.testing.assert_close(
        release, annealed_mean(eccv16_reference, logits, 1.0), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        paper, annealed_mean(eccv16_reference, logits, 0.38), atol=1e-4, rtol=0
    )
    assert (paper - release).abs().max() > 1.0  # sharper distribution: a visibly different ab
    # T -> infinity: a uniform distribution, i.e. the mean of the bin centres everywhere.
    flat = model.decode(logits, temperature=1e6)
    mean_bin = model.model_out.weight[:, :, 0, 0].mean(dim=1) * 110.0
    torch.testing.assert_close(flat, mean_bin.view(1, 2, 1, 1).expand_as(flat), atol=1e-3, rtol=0)
    # The whole path: predict_ab with the option equals the annealed mean of the release network.
    end_to_end = model.predict_ab(lab_l, temperature=0.38)
    assert_same_colours(lab_l, end_to_end, annealed_mean(eccv16_reference, logits, 0.38))
    # The model's default can be set once (the loader's ``temperature``).
    model.temperature = 0.38
    torch.testing.assert_close(model.decode(logits), paper, atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_eccv16_refuses_a_meaningless_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        ZhangECCV16(temperature)


@pytest.mark.slow
@torch.inference_mode()
def test_siggraph17_matches_the_release(
    siggraph17_file: Path, siggraph17_reference: SIGGRAPHGenerator
) -> None:
    model = load_zhang_siggraph17(siggraph17_file)
    assert not model.training
    lab_l = lightness(seed=3)
    got = model.predict_ab(lab_l)
    want = torch.cat([siggraph17_reference(lab_l[i : i + 1]) for i in range(BATCH)])
    assert got.shape == (BATCH, 2, SIZE, SIZE)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)
    assert_same_colours(lab_l, got, want)
    # The test can tell the conventions apart: InstColorization's "no hint" mask (-0.5) moves
    # the colours by more than 1 LSB, so the product is seen to use this file's mask = 0.
    crop = lab_l[:1, :, :32, :32]
    zero_mask = siggraph17_reference(crop)
    inst_mask = siggraph17_reference(crop, mask_B=torch.full_like(crop, -0.5))
    diff = np.abs(rgb8(crop, inst_mask).astype(int) - rgb8(crop, zero_mask).astype(int))
    assert diff.max() > 1


def test_siggraph17_input_is_l_and_zero_hints() -> None:
    lab_l = lightness(seed=4, n=1, size=8)
    x = ZhangSIGGRAPH17(FullImageGenerator(8)).network_input(lab_l)
    assert x.shape == (1, 4, 8, 8)
    torch.testing.assert_close(x[:, :1], (lab_l - 50) / 100)
    assert (x[:, 1:] == 0).all()


# -- strict loading --------------------------------------------------------------------------------

LOADERS = {
    "eccv16": (ECCVGenerator, ECCV16_FILE, load_zhang_eccv16, "model4.2.weight"),
    "siggraph17": (SIGGRAPHGenerator, SIGGRAPH17_FILE, load_zhang_siggraph17, "model8.3.bias"),
}


@pytest.fixture(scope="module")
def small_states() -> dict[str, dict[str, torch.Tensor]]:
    """The release's key names and shapes as zero tensors with one-element storages (small files)."""
    return {
        name: {
            k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in cls().state_dict().items()
        }
        for name, (cls, *_rest) in LOADERS.items()
    }


@pytest.mark.parametrize("family", list(LOADERS))
@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_loading_names_the_file_and_the_key(
    tmp_path: Path, small_states: dict[str, dict[str, torch.Tensor]], family: str, damage: str
) -> None:
    _cls, filename, load, key = LOADERS[family]
    state = dict(small_states[family])
    if damage == "missing":
        del state[key]
        offending, what = key, "missing keys"
    elif damage == "unexpected":
        offending, what = "model11.0.weight", "unexpected keys"
        state[offending] = torch.zeros(1)
    else:
        state[key] = torch.zeros(state[key].numel() + 1)
        offending, what = key, "wrong shapes"
    path = tmp_path / filename
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and offending in message and what in message


def test_loaders_refuse_missing_and_damaged_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_zhang_eccv16(tmp_path / ECCV16_FILE)
    (tmp_path / SIGGRAPH17_FILE).write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_zhang_siggraph17(tmp_path / SIGGRAPH17_FILE)


def test_loader_accepts_a_file_without_num_batches_tracked(
    tmp_path: Path, small_states: dict[str, dict[str, torch.Tensor]]
) -> None:
    # Pre-1.0 PyTorch state dicts lack these counters; they do nothing at inference.
    state = {k: v for k, v in small_states["eccv16"].items() if "num_batches" not in k}
    assert len(state) == 75
    torch.save(state, tmp_path / ECCV16_FILE)
    assert isinstance(load_zhang_eccv16(tmp_path / ECCV16_FILE), ZhangECCV16)


# -- the registry ----------------------------------------------------------------------------------


def test_registry_describes_the_models() -> None:
    assert DEFAULT_MODEL == "instcolor"
    assert set(MODELS) == {
        "instcolor", "zhang-eccv16", "zhang-siggraph17", "larsson-eccv16", "li-dcnn",
        "zhao-pixelated",
    }  # fmt: skip
    # li-dcnn has no published weights: the train command writes them, fetch-weights lists none.
    assert not MODELS["li-dcnn"].published and not MODELS["li-dcnn"].uses_detector
    assert MODELS["li-dcnn"].weight_paths("W") == (Path("W/li-dcnn/li_dcnn.pth"),)
    eccv16, siggraph17 = MODELS["zhang-eccv16"], MODELS["zhang-siggraph17"]
    assert [w.filename for w in eccv16.weights] == [ECCV16_FILE]
    assert eccv16.weights[0].url.endswith("/" + ECCV16_FILE)
    assert eccv16.weights[0].sha256 is not None and eccv16.weights[0].sha256.startswith("9b330a0b")
    assert siggraph17.weights[0].size == 136_787_426
    assert siggraph17.weights[0].sha256 is not None
    assert siggraph17.weights[0].sha256.startswith("df00044c")
    for spec in MODELS.values():
        assert spec.input_size == (128 if spec.name == "zhao-pixelated" else 256)
        for w in spec.weights:  # every hash is a valid hex sha256 (prefix)
            assert w.sha256_prefix is None or int(w.sha256_prefix, 16) >= 0
    assert MODELS["instcolor"].uses_detector
    assert not eccv16.uses_detector and not siggraph17.uses_detector
    assert not MODELS["larsson-eccv16"].uses_detector
    assert eccv16.weight_paths("W") == (Path("W/zhang-eccv16") / ECCV16_FILE,)
    # InstColorization's files stay where fetch-weights has always put them.
    assert MODELS["instcolor"].weight_paths("W")[0] == Path(
        "W/checkpoints/coco_finetuned_mask_256_ffs/latest_net_G.pth"
    )


def test_unknown_model_names_the_known_ones() -> None:
    known = "known models: instcolor, zhang-eccv16, zhang-siggraph17, larsson-eccv16, li-dcnn"
    with pytest.raises(UnknownModelError, match=known):
        get_model("larsson")


def test_registry_loads_from_the_weights_dir(
    tmp_path: Path,
    small_states: dict[str, dict[str, torch.Tensor]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = get_model("zhang-siggraph17")
    assert spec.missing_files(tmp_path) == [tmp_path / "zhang-siggraph17" / SIGGRAPH17_FILE]
    for name, family, filename in (
        ("zhang-eccv16", "eccv16", ECCV16_FILE),
        ("zhang-siggraph17", "siggraph17", SIGGRAPH17_FILE),
    ):
        (tmp_path / name).mkdir()
        torch.save(small_states[family], tmp_path / name / filename)
    with caplog.at_level(logging.WARNING, logger="models.registry"):
        for name, cls in (("zhang-eccv16", ZhangECCV16), ("zhang-siggraph17", ZhangSIGGRAPH17)):
            spec = get_model(name)
            assert spec.missing_files(tmp_path) == []
            model = spec.load(tmp_path)
            assert isinstance(model, cls) and isinstance(model, AutomaticColorizer)
            assert not model.training
    # These files are not the authors' (their sha256 differs): said, not refused.
    assert caplog.text.count("not the authors' weights") == 2


def test_registry_loads_instcolor(tiny_checkpoints: Path, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "coco_finetuned_mask_256_ffs").symlink_to(tiny_checkpoints)
    networks = get_model("instcolor").load(tmp_path)
    assert networks.layout == "official" and networks.width == 8


def test_weight_sources_list_the_zoo_files() -> None:
    from service.weights.sources import WeightSources

    default = WeightSources.default().models
    # instcolor comes in its zip
    assert set(default) == {"zhang-eccv16", "zhang-siggraph17", "larsson-eccv16"}
    (larsson,) = default["larsson-eccv16"]  # the Caffe source, converted after download
    assert larsson.filename == "autocolorize.caffemodel.h5"
    (eccv16,) = default["zhang-eccv16"]
    assert eccv16.filename == ECCV16_FILE
    assert eccv16.url == "https://colorizers.s3.us-east-2.amazonaws.com/" + ECCV16_FILE
    official = "9b330a0bae53f4ded77b1e23defbf78beaa09c10ebc4c4999e8e4f4a160b93f9"
    assert eccv16.matches(official)
    assert not eccv16.matches("9b330a0b" + "0" * 56)  # the full digest is checked, not the prefix
    (siggraph17,) = WeightSources.mirror("http://mirror/w").models["zhang-siggraph17"]
    assert siggraph17.url == "http://mirror/w/" + SIGGRAPH17_FILE
    assert siggraph17.matches("df00044c0a4d7c3edcecf6f75437ce346a66e7a42612d9b968e1a7e17dbc6f66")
