"""Module names, key counts, shapes and the in-place ReLU quirk (spec §2, §3, Appendix A)."""

from __future__ import annotations

import torch

from models.networks import FEATURE_NAMES, FullImageGenerator, FusionGenerator, InstanceGenerator

APPENDIX_A_SAMPLES = {  # key -> shape, from the spec's tables at the official width
    "model1.0.weight": (64, 4, 3, 3),
    "model1.4.num_batches_tracked": (),
    "model5.0.weight": (512, 512, 3, 3),
    "model8up.0.weight": (512, 256, 4, 4),  # ConvTranspose: [in, out, kh, kw]
    "model8.1.weight": (256, 256, 3, 3),
    "model8.5.running_var": (256,),
    "model9up.0.weight": (256, 128, 4, 4),
    "model9.3.running_var": (128,),
    "model10up.0.weight": (128, 128, 4, 4),
    "model10.1.weight": (128, 128, 3, 3),
    "model3short8.0.weight": (256, 256, 3, 3),
    "model2short9.0.weight": (128, 128, 3, 3),
    "model1short10.0.weight": (128, 64, 3, 3),
    "model_class.0.weight": (529, 256, 1, 1),
    "model_out.0.weight": (2, 128, 1, 1),
    "model_out.0.bias": (2,),
}


def params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_trunk_keys_counts_and_shapes_match_appendix_a() -> None:
    for cls in (InstanceGenerator, FullImageGenerator):
        state = cls().state_dict()
        assert len(state) == 107
        for key, shape in APPENDIX_A_SAMPLES.items():
            assert tuple(state[key].shape) == shape, key
        assert state["model1.4.num_batches_tracked"].dtype == torch.int64
        assert params(cls()) == 34_187_027
    bn_layers = {
        k.rsplit(".", 1)[0] for k in InstanceGenerator().state_dict() if "running_mean" in k
    }
    assert bn_layers == {"model1.4", "model2.4", "model3.6", "model4.6", "model5.6", "model6.6",
                         "model7.6", "model8.5", "model9.3"}  # fmt: skip


def test_fusion_keys_counts_and_weight_generators() -> None:
    net = FusionGenerator()
    state = net.state_dict()
    assert len(state) == 275
    assert params(net) == 35_270_831
    assert tuple(state["weight_layer.simple_instance_conv.0.weight"].shape) == (16, 64, 3, 3)
    assert tuple(state["weight_layer4.simple_bg_conv.4.weight"].shape) == (1, 16, 3, 3)
    assert tuple(state["weight_layerout.simple_instance_conv.0.weight"].shape) == (16, 2, 3, 3)
    assert sum(1 for k in state if k.startswith("weight_layer8_1.")) == 12
    trunk = InstanceGenerator().state_dict()
    assert set(trunk) <= set(state)


def test_feature_shapes_and_in_place_relu_quirk() -> None:
    torch.manual_seed(0)
    net = InstanceGenerator(width=8).eval()
    with torch.no_grad():
        out, feats = net(torch.randn(2, 4, 256, 256))
    assert out.shape == (2, 2, 256, 256) and out.abs().max() <= 1.0
    assert list(feats) == list(FEATURE_NAMES)
    sizes = {name: f.shape[-1] for name, f in feats.items()}
    assert sizes == {"conv1_2": 256, "conv2_2": 128, "conv3_3": 64, "conv4_3": 32, "conv5_3": 32,
                     "conv6_3": 32, "conv7_3": 32, "conv8_up": 64, "conv8_3": 64, "conv9_up": 128,
                     "conv9_3": 128, "conv10_up": 256, "conv10_2": 256}  # fmt: skip
    for name in (
        "conv8_up",
        "conv9_up",
        "conv10_up",
    ):  # post-ReLU, as the in-place ReLU leaves them
        assert feats[name].min() >= 0
    assert feats["conv10_2"].min() < 0  # LeakyReLU output is not rectified


def test_full_image_net_is_the_instance_trunk() -> None:
    torch.manual_seed(1)
    g = InstanceGenerator(width=8).eval()
    gcomp = FullImageGenerator(width=8).eval()
    gcomp.load_state_dict(g.state_dict())
    x = torch.randn(1, 4, 256, 256)
    with torch.no_grad():
        assert torch.equal(gcomp(x), g(x)[0])
