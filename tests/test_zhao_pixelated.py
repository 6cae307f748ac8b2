"""Zhao et al.'s networks against the paper's Tables 1 and 2, the mixture likelihood, and sampling.

Expected parameter counts are computed here from the tables (a k x k convolution has
k*k*in*out + out parameters; a gated residual block two 3x3 convolutions C->C and C->2C), not read
from the modules; shapes per block are those the tables list for a 128 x 128 input.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.zhao_pixelated import (
    AB_LEVELS,
    ASPP_DILATIONS,
    COLOUR_ROWS,
    DMOL_CHANNELS,
    EMBEDDING_CHANNELS,
    SEGMENTATION_ROWS,
    SHARED_ROWS,
    GatedResidualBlock,
    TableRow,
    ZhaoPixelated,
    low_resolution_ab,
    mixture_log_prob,
    quantise,
    sample_ab,
    sample_mixture,
)

# The paper's tables, transcribed: (module, resolution at a 128 input, channels, dilation).
TABLE_1 = [
    ("conv", 128, 64, 1), ("res2", 128, 64, 1), ("conv/2", 64, 128, 1), ("res2", 64, 128, 1),
    ("conv/2", 32, 256, 1), ("res2", 32, 256, 1), ("conv", 32, 512, 1), ("res3", 32, 512, 2),
    ("conv", 32, 512, 1), ("res3", 32, 512, 4), ("conv", 32, 160, 1),
]  # fmt: skip
TABLE_2_TOP = [("conv", 32, 512, 1), ("res3", 32, 512, 2)]
CLASSES = 21  # Pascal VOC: 20 classes and background


def conv_params(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def block_params(c: int) -> int:
    return conv_params(3, c, c) + conv_params(3, c, 2 * c)


def table_params(rows: list[tuple[str, int, int, int]], cin: int) -> list[int]:
    """Parameters per table row: a conv from the previous row's channels, or n blocks."""
    out = []
    for module, _, channels, _ in rows:
        if module.startswith("res"):
            out.append(int(module[3:]) * block_params(channels))
        else:
            out.append(conv_params(3, cin, channels))
            cin = channels
    return out


def module_rows(rows: tuple[TableRow, ...], seq: nn.Sequential) -> list[list[nn.Module]]:
    """The modules of a Sequential grouped per table row (ELUs dropped)."""
    modules = [m for m in seq if not isinstance(m, nn.ELU)]
    grouped, i = [], 0
    for row in rows:
        n = row.repeat if row.kind == "res" else 1
        grouped.append(modules[i : i + n])
        i += n
    assert i == len(modules)
    return grouped


@pytest.fixture(scope="module")
def model() -> ZhaoPixelated:
    torch.manual_seed(0)
    return ZhaoPixelated(classes=CLASSES).eval()


def test_rows_are_the_tables() -> None:
    ours = [
        (r.kind, r.resolution, r.channels, r.dilation, r.repeat, r.stride)
        for r in SHARED_ROWS + COLOUR_ROWS
    ]
    paper = [
        (
            "res" if m.startswith("res") else "conv",
            res,
            ch,
            d,
            int(m[3:]) if m.startswith("res") else 1,
            2 if m.endswith("/2") else 1,
        )
        for m, res, ch, d in TABLE_1
    ]
    assert ours == paper
    seg = [(r.kind, r.channels, r.dilation, r.repeat) for r in SEGMENTATION_ROWS]
    assert seg == [("conv", 512, 1, 1), ("res", 512, 2, 3)]
    assert ASPP_DILATIONS == (6, 12, 18)


def test_parameter_counts_per_row(model: ZhaoPixelated) -> None:
    colour = module_rows(SHARED_ROWS, model.trunk.layers) + module_rows(
        COLOUR_ROWS, model.colour.layers
    )
    counted = [sum(p.numel() for m in row for p in m.parameters()) for row in colour]
    assert counted == table_params(TABLE_1, 1)
    seg = module_rows(SEGMENTATION_ROWS, model.segmentation.layers)
    counted_seg = [sum(p.numel() for m in row for p in m.parameters()) for row in seg]
    assert counted_seg == table_params(TABLE_2_TOP, 512)
    aspp = sum(p.numel() for p in model.segmentation.aspp.parameters())
    assert aspp == 3 * conv_params(3, 512, CLASSES)
    dilations = [c.dilation for c in model.segmentation.aspp]  # type: ignore[union-attr]
    assert dilations == [(6, 6), (12, 12), (18, 18)]
    block = GatedResidualBlock(64, 2)
    assert sum(p.numel() for p in block.parameters()) == block_params(64)
    assert block.conv1.dilation == (2, 2) and block.conv2.dilation == (2, 2)


def test_shapes_per_row(model: ZhaoPixelated) -> None:
    """Each row's output at a 128 x 128 input has the table's resolution and channels."""
    shapes: list[tuple[int, int]] = []
    hooks = []
    for seq, rows in ((model.trunk.layers, SHARED_ROWS), (model.colour.layers, COLOUR_ROWS)):
        for row in module_rows(rows, seq):
            hooks.append(
                row[-1].register_forward_hook(
                    lambda _m, _i, out: shapes.append((out.shape[-1], out.shape[1]))
                )
            )
    with torch.no_grad():
        out = model.condition(torch.rand(1, 1, 128, 128) * 100)
    for h in hooks:
        h.remove()
    assert shapes == [(res, ch) for _, res, ch, _ in TABLE_1]
    assert out.embedding.shape == (1, EMBEDDING_CHANNELS, 32, 32)
    assert out.segmentation.shape == (1, CLASSES, 32, 32)
    assert out.embedding_params.shape == (1, DMOL_CHANNELS, 32, 32)
    assert out.condition.shape == (1, EMBEDDING_CHANNELS + CLASSES, 32, 32)
    assert DMOL_CHANNELS == 60  # 10 components x (weight, 2 means, 2 scales, 1 coefficient)


@pytest.fixture(scope="module")
def small() -> ZhaoPixelated:
    torch.manual_seed(1)
    return ZhaoPixelated(classes=5, generator_layers=3, generator_channels=16).eval()


def test_generator_is_causal_in_raster_order(small: ZhaoPixelated) -> None:
    """Changing ab at (r, c) changes the parameters only at pixels after it in raster order."""
    h = w = 6
    cond = torch.randn(1, EMBEDDING_CHANNELS + 5, h, w)
    ab = quantise(torch.rand(1, 2, h, w) * 2 - 1)
    with torch.no_grad():
        base = small.full_parameters(ab, cond)
        for r, c in [(0, 0), (2, 3), (5, 5), (3, 0)]:
            changed = ab.clone()
            changed[:, :, r, c] = -changed[:, :, r, c] + 0.3
            diff = (small.full_parameters(changed, cond) - base).abs().amax(dim=(0, 1))
            order = torch.arange(h * w).reshape(h, w)
            index = r * w + c
            assert diff[order <= index].max() == 0
            assert diff[order == index + 1].max() > 0 if index + 1 < h * w else True
            # no blind spot: the pixel below-right (inside the receptive field) depends on it
            if r + 1 < h and c + 1 < w:
                assert diff[r + 1, c + 1] > 0


def test_mixture_is_a_distribution_over_the_bins() -> None:
    """The discretised mixture sums to 1 over all 256 x 256 (a, b) bins."""
    torch.manual_seed(2)
    params = torch.randn(1, DMOL_CHANNELS, 1, 1)
    params[:, 30:50] -= 2.5  # narrow-ish scales, so edge bins and inner bins both matter
    levels = torch.linspace(-1, 1, AB_LEVELS)
    a, b = torch.meshgrid(levels, levels, indexing="ij")
    grid = torch.stack([a.flatten(), b.flatten()]).reshape(1, 2, 1, -1)
    logp = mixture_log_prob(params.expand(1, -1, 1, grid.shape[-1]), grid)
    assert torch.logsumexp(logp.flatten(), 0).exp().item() == pytest.approx(1.0, abs=2e-3)


def test_sampler_draws_from_the_likelihood() -> None:
    """Draws of ``sample_mixture`` have the moments of the enumerated likelihood."""
    torch.manual_seed(3)
    params = torch.randn(1, DMOL_CHANNELS)
    params[:, 30:50] -= 2.0
    levels = torch.linspace(-1, 1, AB_LEVELS)
    a, b = torch.meshgrid(levels, levels, indexing="ij")
    grid = torch.stack([a.flatten(), b.flatten()]).reshape(1, 2, 1, -1)
    p = mixture_log_prob(params[:, :, None, None].expand(1, -1, 1, grid.shape[-1]), grid).exp()
    p = (p / p.sum()).flatten()
    expected = (grid[0, :, 0] * p).sum(-1)
    expected_ab = (grid[0, 0, 0] * grid[0, 1, 0] * p).sum()
    draws = sample_mixture(params.expand(40000, -1), torch.rand(40000, 3))
    assert torch.allclose(draws.mean(0), expected, atol=0.02)
    assert (draws[:, 0] * draws[:, 1]).mean().item() == pytest.approx(expected_ab.item(), abs=0.02)
    assert torch.equal(draws, quantise(draws))  # on the bins


def test_incremental_sampling_equals_full_computation(small: ZhaoPixelated) -> None:
    """Every pixel's mixture seen by the incremental sampler is the parallel network's."""
    lightness = torch.rand(2, 1, 32, 32) * 100
    result = sample_ab(small, lightness, seeds=[11, 12], samples=3)
    assert result.ab.shape == (2, 3, 2, 8, 8)
    with torch.no_grad():
        cond = small.condition(lightness).condition.repeat_interleave(3, dim=0)
        full = small.full_parameters(result.ab.flatten(0, 1), cond)
    assert torch.allclose(full, result.parameters.flatten(0, 1), atol=1e-5, rtol=1e-5)
    assert full.abs().max() > 0.01


def test_same_seed_same_sample(small: ZhaoPixelated) -> None:
    lightness = torch.rand(2, 1, 32, 32) * 100
    first = sample_ab(small, lightness, seeds=[5, 6], samples=2).ab
    again = sample_ab(small, lightness, seeds=[5, 6], samples=2).ab
    assert torch.equal(first, again)
    other = sample_ab(small, lightness, seeds=[7, 6], samples=2).ab
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0, 0], first[0, 1])  # two samples of one image differ
    alone = sample_ab(small, lightness[1:], seeds=[6], samples=1).ab
    assert torch.allclose(alone[0, 0], first[1, 0])  # sample 0 of seed 6, with or without company


def test_low_resolution_target_is_on_the_bins() -> None:
    ab = torch.randn(1, 2, 128, 128) * 60
    low = low_resolution_ab(ab)
    assert low.shape == (1, 2, 32, 32)
    assert torch.equal(low, quantise(low)) and low.abs().max() <= 1.0


def test_images_in_one_batch_may_ask_for_different_sample_counts(small: ZhaoPixelated) -> None:
    lightness = torch.rand(2, 1, 32, 32) * 100
    mixed = sample_ab(small, lightness, seeds=[3, 4], samples=[1, 3])
    assert mixed.counts == (1, 3) and mixed.flat_ab.shape == (4, 2, 8, 8)
    alone = sample_ab(small, lightness[1:], seeds=[4], samples=3)
    assert torch.allclose(mixed.image(1), alone.ab[0])
    with pytest.raises(ValueError, match="different sample counts"):
        _ = mixed.ab
