"""Colour hints (issue 21): placement, the API / CLI / batch options, faithfulness to the
network on the same hint tensors, and a constructed network that follows hints.

Seeded weights in the official SIGGRAPH17 layout, loaded by the real loader; the independent
computation is ``tests/reference_impl.py`` (NumPy Lab, its own trunk wiring) on hint planes
built here by hand.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import quote

import image_corpus as corpus
import numpy as np
import pytest
import torch
from PIL import Image
from reference_impl import np_lab_norm2rgb, np_rgb2lab_norm_l, np_to_uint8, trunk_forward
from service_helpers import running_app, service_settings

from models.checkpoints import load_networks
from models.constants import MAX_HINTS
from models.hints import Hint, HintError, check_hints, hex_to_ab, hint_planes, sample_hints
from models.lab import rgb_to_lab
from models.networks import FullImageGenerator
from models.pipeline import ColorizeOptions
from models.registry import get_model
from models.zoo import load_colorizer

PNG = {"content-type": "image/png"}


def np_hex_to_ab(color: str) -> tuple[float, float]:
    """sRGB hex -> Lab ab in float64 with the spec's constants (§5.4), independently."""
    rgb = np.array([int(color[i : i + 2], 16) / 255.0 for i in (1, 3, 5)])
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                  [0.019334, 0.119193, 0.950227]])  # fmt: skip
    xyz = m @ lin / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


# -- placement ----------------------------------------------------------------------------------


def test_a_hint_covers_a_centred_patch_in_network_coordinates() -> None:
    # 80 x 60 input -> 256 x 256: x 20 -> column 64, y 45 -> row 192; size 3: rows/cols -1..+1
    ab, mask = hint_planes([Hint(20, 45, 30.0, -20.0, 3)], 80, 60, 256)
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (191, 193, 63, 65)
    assert ab[0, 191:194, 63:66].eq(30.0).all() and ab[1, 191:194, 63:66].eq(-20.0).all()
    assert ab.abs().sum() == 9 * 50.0  # nothing outside the patch
    # even size: one more pixel after the point; at the corner the patch is clipped
    _, mask = hint_planes([Hint(0, 0, 1.0, 1.0, 4)], 80, 60, 256)
    assert torch.nonzero(mask[0]).max(0).values.tolist() == [2, 2]
    assert mask.sum() == 9
    # a later hint overwrites an earlier one where they overlap
    ab, _ = hint_planes([Hint(40, 30, 10, 10, 5), Hint(40, 30, -5, -5, 1)], 80, 60, 256)
    assert ab[0, 128, 128] == -5 and ab[0, 127, 127] == 10


def test_hex_colours_give_the_lab_ab_of_the_spec() -> None:
    for color in ("#ff0000", "#3a7bd5", "#00ff00", "#808080", "#102030"):
        a, b = hex_to_ab(color)
        want = np_hex_to_ab(color)
        assert a == pytest.approx(want[0], abs=1e-3) and b == pytest.approx(want[1], abs=1e-3)
    with pytest.raises(HintError, match="#rrggbb"):
        hex_to_ab("red")


def test_hints_outside_the_image_or_too_many_are_refused() -> None:
    with pytest.raises(HintError, match="outside the image"):
        check_hints([Hint(80, 10, 0, 0)], 80, 60)
    with pytest.raises(HintError, match=f"at most {MAX_HINTS}"):
        check_hints([Hint(1, 1, 0, 0)] * (MAX_HINTS + 1), 80, 60)
    check_hints([Hint(79.5, 59.9, 0, 0)], 80, 60)


def test_random_hints_follow_the_authors_sampling() -> None:
    """Geometric count (mean (1 - p) / p), sizes 1-9, each patch the mean of its ground truth."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand((400, 2, 32, 32), generator=generator) * 2 - 1
    hint, mask = sample_hints(truth, 0.25, generator)
    assert sample_hints(truth[:4], 1.0)[1].sum() == 0  # p = 1: never a hint (released setting)
    hinted = mask.flatten(1).amax(1)
    # P(no hint) = p: 0.25 of 400 images, within a generous binomial margin
    assert 70 <= int((hinted == 0).sum()) <= 130
    assert mask.dtype == truth.dtype and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.where(mask.expand_as(hint) == 0, hint, torch.zeros(())).abs().max() == 0
    # a lone patch holds its ground-truth mean
    one, one_mask = sample_hints(truth[:1], 0.0, torch.Generator().manual_seed(3), max_points=1)
    rows, cols = torch.nonzero(one_mask[0, 0], as_tuple=True)
    side = int(rows.max() - rows.min() + 1)
    assert 1 <= side <= 9 and side == int(cols.max() - cols.min() + 1)
    patch = truth[0, :, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert torch.allclose(one[0, :, rows[0], cols[0]], patch.mean(dim=(1, 2)))


# -- faithfulness on seeded weights ----------------------------------------------------------


def independent_output(
    weights: Path, photo: Image.Image, hint_ab: np.ndarray, hint_mask: np.ndarray
) -> np.ndarray:
    """The released network's output at 256 on hand-made hint planes, computed independently:
    NumPy L of the PIL-resized input, the reference trunk wiring, NumPy Lab -> RGB -> uint8."""
    (path,) = get_model("zhang-siggraph17").weight_paths(weights)
    net = FullImageGenerator(64)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval()
    rgb = np.asarray(photo.resize((256, 256), Image.BILINEAR), dtype=np.float32) / 255
    l_norm = np_rgb2lab_norm_l(rgb.transpose(2, 0, 1))
    x = np.concatenate([l_norm, hint_ab / np.float32(110), hint_mask])[None].astype(np.float32)
    with torch.no_grad():
        ab_norm = trunk_forward(net, torch.from_numpy(x))[0][0].numpy()
    return np_to_uint8(np_lab_norm2rgb(l_norm, ab_norm)).transpose(1, 2, 0)


async def test_the_api_output_with_hints_is_the_network_on_the_same_hint_tensors(
    zoo_weights: Path,
) -> None:
    photo = corpus.gray(80, 60, seed=4).convert("RGB")
    hints = [
        {"x": 20, "y": 45, "ab": [40.0, -30.0], "size": 3},
        {"x": 70.5, "y": 5, "color": "#3a7bd5", "size": 6},
    ]
    # by hand: (20, 45) -> (64, 192), rows/cols -1..+1; (70.5, 5) -> column 225, row 21, size 6
    # -> rows 19..24, columns 223..228; the colour's ab from the independent conversion
    hint_ab = np.zeros((2, 256, 256), np.float32)
    hint_mask = np.zeros((1, 256, 256), np.float32)
    hint_ab[:, 191:194, 63:66] = np.array([40.0, -30.0], np.float32)[:, None, None]
    hint_mask[:, 191:194, 63:66] = 1
    a, b = np_hex_to_ab("#3a7bd5")
    hint_ab[:, 19:25, 223:229] = np.array([a, b], np.float32)[:, None, None]
    hint_mask[:, 19:25, 223:229] = 1
    want = independent_output(zoo_weights, photo, hint_ab, hint_mask)
    automatic = independent_output(zoo_weights, photo, hint_ab * 0, hint_mask * 0)

    buffer = io.BytesIO()
    photo.save(buffer, "PNG")
    settings = service_settings(
        zoo_weights / "checkpoints", weights_dir=zoo_weights, models="zhang-siggraph17"
    )
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        query = f"resolution=network&format=png&hints={quote(json.dumps(hints))}"
        answer = await client.post(f"/colorize?{query}", content=buffer.getvalue(), headers=PNG)
        assert answer.status_code == 200, answer.text
        plain = await client.post(
            "/colorize?resolution=network&format=png", content=buffer.getvalue(), headers=PNG
        )
    got = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB"), dtype=int)
    assert np.abs(got - want.astype(int)).max() <= 1
    # the hints change the result (seeded weights react to them), and the no-hint run is the
    # network's automatic mode (mask 0: the release's convention)
    assert np.abs(want.astype(int) - automatic.astype(int)).max() > 1
    unhinted = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB"), dtype=int)
    assert np.abs(unhinted - automatic.astype(int)).max() <= 1


async def test_bad_hints_get_422_with_a_message(zoo_weights: Path) -> None:
    settings = service_settings(
        zoo_weights / "checkpoints", weights_dir=zoo_weights, models="zhang-siggraph17,zhang-eccv16"
    )
    image = corpus.png(80, 60)
    cases = {
        "model=zhang-eccv16&hints=" + quote('[{"x":1,"y":1,"color":"#ff0000"}]'): "takes no colour hints",
        "hints=" + quote('[{"x":80,"y":1,"color":"#ff0000"}]'): "outside the image",
        "hints=" + quote(json.dumps([{"x": 1, "y": 1, "ab": [0, 0]}] * (MAX_HINTS + 1))): f"at most {MAX_HINTS}",
        "hints=" + quote('[{"x":1,"y":1,"color":"red"}]'): "color",
        "hints=" + quote('[{"x":1,"y":1}]'): "exactly one of",
        "hints=" + quote('[{"x":1,"y":1,"color":"#ff0000","size":12}]'): "size",
        "hints=" + quote('[{"x":1,"y":1,"ab":[200,0]}]'): "[-110, 110]",
        "hints=" + quote('[{"x":1,"y":1,"ab":[0,0],"z":1}]'): "z",
        "hints=" + quote("[{"): "not valid JSON",
        "hints=" + quote('{"x":1}'): "JSON list",
    }  # fmt: skip
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        for query, message in cases.items():
            refused = await client.post(f"/colorize?{query}", content=image, headers=PNG)
            assert refused.status_code == 422, (query, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
            assert message in refused.json()["detail"], (query, refused.json()["detail"])
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert listed["zhang-siggraph17"]["takes_hints"] is True
        assert listed["zhang-eccv16"]["takes_hints"] is False
        schema = (await client.get("/openapi.json")).json()
    (param,) = [
        p for p in schema["paths"]["/colorize"]["post"]["parameters"] if p["name"] == "hints"
    ]
    content = param["schema"]["contentSchema"]
    assert content["maxItems"] == MAX_HINTS
    assert content["items"] == {"$ref": "#/components/schemas/HintPoint"}
    point = schema["components"]["schemas"]["HintPoint"]
    assert set(point["properties"]) == {"x", "y", "color", "ab", "size"}
    assert (
        point["properties"]["size"]["minimum"] == 1 and point["properties"]["size"]["maximum"] == 9
    )


def test_instcolor_refuses_hints(tiny_colorizer: object) -> None:
    from models.pipeline import OptionsError

    with pytest.raises(OptionsError, match="takes no colour hints"):
        tiny_colorizer.prepare(  # type: ignore[attr-defined]
            Image.new("RGB", (32, 32)), ColorizeOptions(hints=(Hint(1, 1, 0, 0),))
        )


def test_hints_are_part_of_the_result_cache_key() -> None:
    from service.core.jobs import JobOptions
    from service.queues.redis.protocol import cache_digest

    hint = [{"x": 1.0, "y": 2.0, "color": "#ff0000", "size": 3}]
    plain = cache_digest(b"img", JobOptions(), "v")
    assert cache_digest(b"img", JobOptions(hints=hint), "v") != plain
    moved = [{**hint[0], "x": 2.0}]
    assert cache_digest(b"img", JobOptions(hints=moved), "v") != cache_digest(
        b"img", JobOptions(hints=hint), "v"
    )
    assert cache_digest(b"img", JobOptions(hints=list(hint)), "v") == cache_digest(
        b"img", JobOptions(hints=hint), "v"
    )


def test_batch_item_options_take_hints() -> None:
    from service.batches.options import check_options, job_options
    from service.core.errors import InvalidParameterError
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    options = check_options({"hints": [{"x": 3, "y": 4, "color": "#00ff00"}]}, settings)
    assert job_options(options, settings).hints == [
        {"x": 3.0, "y": 4.0, "color": "#00ff00", "size": 3}
    ]
    with pytest.raises(InvalidParameterError, match="exactly one of"):
        check_options({"hints": [{"x": 3, "y": 4}]}, settings)


# -- a network that follows hints -----------------------------------------------------------


def hint_copying_generator(width: int = 64) -> FullImageGenerator:
    """A SIGGRAPH17 generator built by hand to copy its hint plane to its output.

    Every weight is 0 but one path: model1 splits hint a and b into positive and negative parts
    (conv then ReLU), carries them through its second conv, the conv1 -> conv10 shortcut and
    model10 as identities, and ``model_out`` recombines them, so the output is
    tanh(hint ab / 110) where hinted and 0 (grey) elsewhere. BatchNorms are identities.
    """
    net = FullImageGenerator(width)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.eps = 0.0
        first, second = net.model1[0], net.model1[2]
        for channel, (source, sign) in enumerate(((1, 1), (1, -1), (2, 1), (2, -1))):
            first.weight[channel, source, 1, 1] = sign
            second.weight[channel, channel, 1, 1] = 1
            net.model1short10[0].weight[channel, channel, 1, 1] = 1
            net.model10[1].weight[channel, channel, 1, 1] = 1
        out = net.model_out[0].weight
        out[0, 0], out[0, 1], out[1, 2], out[1, 3] = 1, -1, 1, -1
    return net.eval()


def test_a_constructed_hint_following_network_reproduces_the_hinted_colour(
    tmp_path: Path,
) -> None:
    """Through the product (file in the release's layout, real loader, hint placement, merge):
    the hinted colour comes back at its point, grey elsewhere."""
    (path,) = get_model("zhang-siggraph17").weight_paths(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(hint_copying_generator().state_dict(), path)
    pipeline = load_colorizer("zhang-siggraph17", tmp_path, channels_last=False)
    photo = Image.new("RGB", (96, 64), (118, 118, 118))
    color = "#b86a48"  # a brick colour: a, b about (23, 29)
    hints = (Hint.from_color(30, 20, color, 5),)
    (result,) = pipeline.colorize([photo], ColorizeOptions(resolution="network", hints=hints))
    lab = rgb_to_lab(torch.from_numpy(np.array(result.image)).permute(2, 0, 1) / 255.0)
    want = torch.tensor(np_hex_to_ab(color))
    at_point = lab[1:, 80, 80]  # (30, 20) * 256 / (96, 64) = (80, 80)
    assert torch.allclose(at_point, want.float(), atol=2.5), (at_point, want)
    assert lab[1:, 150:, 150:].abs().max() < 1.0  # far away: grey
    # at the original resolution the colour is there around the point (bilinear ab upsampling)
    (full,) = pipeline.colorize([photo], ColorizeOptions(hints=hints))
    lab_full = rgb_to_lab(torch.from_numpy(np.array(full.image)).permute(2, 0, 1) / 255.0)
    assert lab_full[1, 20, 30] > 5 and lab_full[2, 20, 30] > 5


# -- the command line -------------------------------------------------------------------------


def test_colorize_hints_file_gives_the_pipeline_result_and_refuses_mistakes(
    tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    corpus.gray(64, 48, seed=5).save(tmp_path / "a.png")
    corpus.gray(64, 48, seed=6).save(tmp_path / "b.png")
    hints = [{"x": 10, "y": 30, "color": "#3a7bd5", "size": 4}]
    (tmp_path / "hints.json").write_text(json.dumps({"a.png": hints}))
    common = ["--weights-dir", str(zoo_weights), "--precision", "fp32", "--no-progress"]
    code = main(["colorize", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                 str(tmp_path / "out"), "--model", "zhang-siggraph17",
                 "--hints", str(tmp_path / "hints.json"), *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    pipeline = load_colorizer("zhang-siggraph17", zoo_weights)
    options = ColorizeOptions(hints=tuple(Hint.from_dict(h) for h in hints))
    for name, opts in (("a", options), ("b", ColorizeOptions())):
        (want,) = pipeline.colorize([Image.open(tmp_path / f"{name}.png")], opts)
        got = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"), dtype=int)
        assert np.abs(got - np.asarray(want.image, dtype=int)).max() <= 1, name
    # a list applies to every input; mistakes are usage errors (exit 2) naming the problem
    (tmp_path / "bad.json").write_text(json.dumps([{"x": 1, "y": 1, "color": "blue"}]))
    code = main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "o2"), "--model",
                 "zhang-siggraph17", "--hints", str(tmp_path / "bad.json"), *common])  # fmt: skip
    assert code == 2 and "color" in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps(hints))
    code = main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "o3"), "--model",
                 "zhang-eccv16", "--hints", str(tmp_path / "ok.json"), *common])  # fmt: skip
    assert code == 2 and "takes no colour hints" in capsys.readouterr().err
    # --engine ray refuses them as early, before any Ray starts (its hints: test_ray_engine.py)
    code = main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "o4"), "--engine",
                 "ray", "--model", "zhang-eccv16", "--hints", str(tmp_path / "ok.json"),
                 *common])  # fmt: skip
    assert code == 2 and "takes no colour hints" in capsys.readouterr().err


# -- training with hints and hinted evaluation -----------------------------------------------


@pytest.mark.parametrize("stage", ["full", "instance", "fusion"])
def test_every_stage_trains_on_the_authors_random_hints(stage: str, tiny_checkpoints: Path) -> None:
    """While training the networks see [L, hint ab / 110, mask - 0.5] with the hints that
    ``sample_hints`` draws from the ground truth (the same seed, recomputed here); crops get
    their own hints from their own ground truth; validation is automatic."""
    from models.checkpoints import load_networks
    from training.stages import build_stage

    model = build_stage(stage, load_networks(tiny_checkpoints), hint_sample_p=0.3, hint_seed=7)  # type: ignore[arg-type]
    torch.manual_seed(0)
    batch: dict[str, object] = {
        "l": torch.rand(2, 1, 256, 256) - 0.5,
        "ab": torch.rand(2, 2, 256, 256) * 0.4 - 0.2,
    }
    if stage == "fusion":
        from models.boxes import FUSION_SCALES, box_info

        boxes = [(2, 3, 20, 25), (12, 6, 38, 30)]
        batch["crops"] = torch.rand(4, 1, 256, 256) - 0.5
        batch["crops_ab"] = torch.rand(4, 2, 256, 256) * 0.4 - 0.2
        batch["box_info"] = [
            [{s: box_info(b, 40, 32, s) for s in FUSION_SCALES} for b in boxes]
        ] * 2
    seen: list[torch.Tensor] = []
    nets = [model.networks.instance, model.networks.fusion, model.networks.full_image]
    if stage != "fusion":
        nets = [model.module.net]  # type: ignore[list-item]
    for net in nets:
        net.model1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    model.set_mode(True)
    model.module(batch)
    generator = torch.Generator().manual_seed(7)
    expected = []
    pairs = [("crops", "crops_ab"), ("l", "ab")] if stage == "fusion" else [("l", "ab")]
    for l_key, ab_key in pairs:
        hint, mask = sample_hints(batch[ab_key], 0.3, generator)  # type: ignore[arg-type]
        expected.append(torch.cat((batch[l_key], hint, mask - 0.5), dim=1))  # type: ignore[list-item]
    assert len(seen) == len(expected)
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
        assert set(got[:, 3].unique().tolist()) == {
            -0.5,
            0.5,
        }  # some hints, InstColorization's mask
    seen.clear()
    model.set_mode(False)
    model.module(batch)
    assert all(x[:, 3].eq(-0.5).all() and x[:, 1:3].eq(0).all() for x in seen)


def test_train_hint_sample_p_runs_every_stage(
    tmp_path: Path, tiny_checkpoints: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_training import make_data, write_photos

    from service.cli import main

    data = make_data(tmp_path, write_photos(tmp_path / "photos"), 2, 0)
    init = tiny_checkpoints
    for stage in ("full", "instance", "fusion"):
        out = tmp_path / f"run-{stage}"
        code = main(["train", "--stage", stage, "--data", str(data), "--init", str(init),
                     "--output", str(out), "--hint-sample-p", "0.125", "--max-steps", "1",
                     "--batch-size", "1", "--workers", "0", "--no-progress"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        assert (out / "checkpoints" / "latest_net_GComp.pth").is_file()
        # the marker that lets the pipeline pass hints to these networks (docs/hints.md)
        assert load_networks(out / "checkpoints").takes_hints is True
    code = main(["train", "--stage", "full", "--data", str(data), "--init", str(init), "--output",
                 str(tmp_path / "bad"), "--hint-sample-p", "0", "--workers", "0"])  # fmt: skip
    assert code == 2 and "--hint-sample-p must be in (0, 1]" in capsys.readouterr().err


def test_ground_truth_hints_reveal_the_patch_mean_where_the_pipeline_puts_them() -> None:
    from models.hints import ground_truth_hints
    from models.preprocess import to_tensor

    colour = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    hints = ground_truth_hints(colour, 5, (64, 48), torch.Generator().manual_seed(1))
    assert len(hints) == 5
    ab = rgb_to_lab(to_tensor(colour.resize((256, 256), Image.BILINEAR)))[1:]
    for hint in hints:
        planes, mask = hint_planes([hint], 64, 48, 256)
        patch = mask[0] > 0
        assert torch.allclose(planes[:, patch][:, 0], ab[:, patch].mean(dim=1), atol=1e-4)
        assert 1 <= hint.size <= 9 and int(patch.sum()) <= hint.size**2


def test_evaluate_hints_scores_hinted_runs_and_refuses_models_without_hints(
    tmp_path: Path, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate --compare over hint counts: one report per count; a network that copies its
    hints (constructed above) scores higher with ground-truth hints than without."""
    from service.cli import main

    weights = tmp_path / "weights"
    (path,) = get_model("zhang-siggraph17").weight_paths(weights)
    path.parent.mkdir(parents=True)
    torch.save(hint_copying_generator().state_dict(), path)
    truth = tmp_path / "truth"
    truth.mkdir()
    for i in range(2):
        rng = np.random.default_rng(i)
        field = np.kron(rng.random((4, 4, 3)), np.ones((16, 16, 1)))  # big flat colour blocks
        Image.fromarray((field * 200 + 30).astype(np.uint8)).save(truth / f"t{i}.png")
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "report"), "--model",
                 "zhang-siggraph17", "--weights-dir", str(weights), "--precision", "fp32",
                 "--no-progress", "--compare", "h0=--hints 0", "h40=--hints 40"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summaries = {
        name: json.loads((tmp_path / "report" / name / "summary.json").read_text())
        for name in ("h0", "h40")
    }
    assert summaries["h40"]["config"]["hints"] == 40
    psnr = {k: v["metrics"]["psnr"]["mean"] for k, v in summaries.items()}
    # the hinted patches come back right and the rest stays grey: better, by the area revealed
    assert psnr["h40"] > psnr["h0"], psnr
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "r2"), "--model", "zhang-eccv16",
                 "--weights-dir", str(zoo_weights), "--hints", "3", "--no-progress"])  # fmt: skip
    assert code == 2 and "takes no colour hints" in capsys.readouterr().err


def test_hints_cross_the_redis_stream_and_entries_without_hints_are_unchanged() -> None:
    from service.core.jobs import Job, JobOptions
    from service.queues.redis.protocol import job_fields, job_from_fields

    hints = [{"x": 1.0, "y": 2.0, "ab": [3.0, -4.0], "size": 3}]
    job = Job("r", b"img", JobOptions(hints=hints), deadline=2.0, enqueued_at=1.0)
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in job_fields(job, "t").items()
    }
    assert job_from_fields(fields)[1].options.hints == hints
    plain = job_fields(Job("r", b"img", JobOptions(), deadline=2.0, enqueued_at=1.0), "t")
    assert "hints" not in json.loads(plain["meta"])["options"]
