"""A deliberately naive, one-image-at-a-time transcription of the reference behaviour (the spec).

It shares nothing with the product's forward code but the modules holding the weights: its own
trunk wiring with the in-place ReLU of the reference, a Python loop over instances with
``F.interpolate`` + ``F.pad``, the stacked weighted sum, its own Lab conversion in NumPy float32,
and PIL for resizing and cropping. The product's batched, vectorised pipeline is tested against it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.networks import ColorizationTrunk, FusionGenerator

SCALES = (256, 128, 64, 32)
FUSION_POINTS = [  # (weight layer, box_info scale) in forward order, spec §4.5
    ("weight_layer", 256), ("weight_layer2", 128), ("weight_layer3", 64), ("weight_layer4", 32),
    ("weight_layer5", 32), ("weight_layer6", 32), ("weight_layer7", 32), ("weight_layer8_1", 64),
    ("weight_layer8_2", 64), ("weight_layer9_1", 128), ("weight_layer9_2", 128),
    ("weight_layer10_1", 256), ("weight_layer10_2", 256),
]  # fmt: skip


# -- Lab, spec §5.4, in NumPy float32 with the reference's mask arithmetic -----------------------


def np_rgb2lab_norm_l(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] -> (1, H, W) normalised L."""
    rgb = rgb.astype(np.float32)
    mask = (rgb > np.float32(0.04045)).astype(np.float32)
    lin = (
        ((rgb + np.float32(0.055)) / np.float32(1.055)) ** np.float32(2.4)
    ) * mask + rgb / np.float32(12.92) * (1 - mask)
    y = (
        np.float32(0.212671) * lin[0]
        + np.float32(0.715160) * lin[1]
        + np.float32(0.072169) * lin[2]
    )
    y = y / np.float32(1.0)
    m = (y > np.float32(0.008856)).astype(np.float32)
    fy = y ** np.float32(1 / 3.0) * m + (np.float32(7.787) * y + np.float32(16.0 / 116.0)) * (1 - m)
    lightness = np.float32(116.0) * fy - np.float32(16.0)
    return ((lightness - np.float32(50.0)) / np.float32(100.0))[None]


def np_lab_norm2rgb(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    f32 = np.float32
    lightness = l_norm[0] * f32(100.0) + f32(50.0)
    a, b = ab_norm[0] * f32(110.0), ab_norm[1] * f32(110.0)
    y_int = (lightness + f32(16.0)) / f32(116.0)
    x_int = a / f32(500.0) + y_int
    z_int = np.maximum(f32(0.0), y_int - b / f32(200.0))
    out = np.stack([x_int, y_int, z_int]).astype(np.float32)
    mask = (out > f32(0.2068966)).astype(np.float32)
    out = (out ** f32(3.0)) * mask + (out - f32(16.0 / 116.0)) / f32(7.787) * (1 - mask)
    out = out * np.array([0.95047, 1.0, 1.08883], dtype=np.float32)[:, None, None]
    x, y, z = out
    r = f32(3.24048134) * x - f32(1.53715152) * y - f32(0.49853633) * z
    g = f32(-0.96925495) * x + f32(1.87599) * y + f32(0.04155593) * z
    bb = f32(0.05564664) * x - f32(0.20404134) * y + f32(1.05731107) * z
    rgb = np.maximum(np.stack([r, g, bb]), f32(0.0))
    mask = (rgb > f32(0.0031308)).astype(np.float32)
    rgb = (f32(1.055) * (rgb ** f32(1.0 / 2.4)) - f32(0.055)) * mask + f32(12.92) * rgb * (1 - mask)
    return np.clip(rgb, 0, 1)


def np_to_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rgb.astype(np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)


# -- inputs, spec §5.3 / §5.5 ---------------------------------------------------------------------


def net_input(image: Image.Image) -> torch.Tensor:
    rgb = np.asarray(image.resize((256, 256), Image.BILINEAR), dtype=np.uint8).transpose(
        2, 0, 1
    ) / np.float32(255)
    l_norm = torch.from_numpy(np_rgb2lab_norm_l(rgb.astype(np.float32)))
    return torch.cat([l_norm, torch.zeros(2, 256, 256), torch.full((1, 256, 256), -0.5)])[None]


def box_info_ref(box: tuple[int, int, int, int], width: int, height: int, s: int) -> list[int]:
    x1, y1, x2, y2 = box
    sx, ex = int(x1 / width * s), int(x2 / width * s)
    sy, ey = int(y1 / height * s), int(y2 / height * s)
    if ex - sx < 1:
        if s - ex > 1:
            ex += 1
        else:
            sx -= 1
    if ey - sy < 1:
        if s - ey > 1:
            ey += 1
        else:
            sy -= 1
    return [sx, s - ex, sy, s - ey, ex - sx, ey - sy]


# -- networks, spec §2 and §4 ---------------------------------------------------------------------


def trunk_forward(net: ColorizationTrunk, x: torch.Tensor, fuse=None) -> tuple[torch.Tensor, dict]:  # type: ignore[no-untyped-def]
    """The reference forward with its in-place ReLU at the start of model8/9/10."""
    f = fuse or (lambda _i, t: t)
    feats: dict[str, torch.Tensor] = {}
    conv1_2 = f(0, net.model1(x))
    feats["conv1_2"] = conv1_2
    conv2_2 = f(1, net.model2(conv1_2[:, :, ::2, ::2]))
    feats["conv2_2"] = conv2_2
    conv3_3 = f(2, net.model3(conv2_2[:, :, ::2, ::2]))
    feats["conv3_3"] = conv3_3
    conv4_3 = f(3, net.model4(conv3_3[:, :, ::2, ::2]))
    feats["conv4_3"] = conv4_3
    conv5_3 = f(4, net.model5(conv4_3))
    feats["conv5_3"] = conv5_3
    conv6_3 = f(5, net.model6(conv5_3))
    feats["conv6_3"] = conv6_3
    conv7_3 = f(6, net.model7(conv6_3))
    feats["conv7_3"] = conv7_3
    conv8_up = f(7, net.model8up(conv7_3) + net.model3short8(conv3_3))
    feats["conv8_up"] = conv8_up
    conv8_3 = f(8, net.model8[1:](torch.relu_(conv8_up)))
    feats["conv8_3"] = conv8_3
    conv9_up = f(9, net.model9up(conv8_3) + net.model2short9(conv2_2))
    feats["conv9_up"] = conv9_up
    conv9_3 = f(10, net.model9[1:](torch.relu_(conv9_up)))
    feats["conv9_3"] = conv9_3
    conv10_up = f(11, net.model10up(conv9_3) + net.model1short10(conv1_2))
    feats["conv10_up"] = conv10_up
    conv10_2 = f(12, net.model10[1:](torch.relu_(conv10_up)))
    feats["conv10_2"] = conv10_2
    return net.model_out(conv10_2), feats  # fmt: skip


def fuse_one(
    gf: FusionGenerator,
    point: int,
    full: torch.Tensor,
    inst: torch.Tensor,
    infos: list[dict[int, list[int]]],
) -> torch.Tensor:
    name, scale = FUSION_POINTS[point]
    wg = gf.get_submodule(name)
    size = full.shape[-1]
    feats, logits, masks = [], [], []
    for i, info in enumerate(infos):
        left, right, top, bottom, w, h = info[scale]
        one = inst[i : i + 1]
        feats.append(
            F.pad(
                F.interpolate(one, size=(h, w), mode="bilinear", align_corners=False),
                (left, right, top, bottom),
            )
        )
        logit = wg.simple_instance_conv(one)
        logits.append(
            F.pad(
                F.interpolate(logit, size=(h, w), mode="bilinear", align_corners=False),
                (left, right, top, bottom),
            )
        )
        mask = torch.zeros(1, 1, size, size)
        mask[:, :, top : top + h, left : left + w] = 1.0
        masks.append(mask)
    union = torch.clamp(torch.sum(torch.cat(masks), dim=0, keepdim=True), max=1.0)
    bg = wg.simple_bg_conv(full) + 100000 * (1 - union)
    weights = torch.softmax(torch.cat([*logits, bg], dim=1), dim=1)
    stacked = torch.cat([*feats, full], dim=0)
    return torch.sum(stacked * weights.permute(1, 0, 2, 3), dim=0, keepdim=True)


@torch.no_grad()
def reference_colorize(
    image: Image.Image, boxes: list[tuple[int, int, int, int]], instance, fusion, full_image
) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """ab (2, 256, 256) and the 256x256 uint8 RGB output, one image, its int boxes in order."""
    x = net_input(image)
    if not boxes:
        ab = trunk_forward(full_image, x)[0]
    else:
        width, height = image.size
        crops = torch.cat([net_input(image.crop(b)) for b in boxes])
        _, inst_feats = trunk_forward(instance, crops)
        order = list(inst_feats.values())
        infos = [{s: box_info_ref(b, width, height, s) for s in SCALES} for b in boxes]
        ab = trunk_forward(fusion, x, lambda i, t: fuse_one(fusion, i, t, order[i], infos))[0]
    ab_np = ab[0].numpy()
    rgb = np_lab_norm2rgb(x[0, :1].numpy(), ab_np)
    return ab_np, np_to_uint8(rgb).transpose(1, 2, 0)
