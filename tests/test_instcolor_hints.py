"""InstColorization with colour hints: a hint-trained checkpoint (``hints.json`` beside the three
files, written by ``train --hint-sample-p``) takes hints, placed as training places them; the
released checkpoints keep refusing them (docs/hints.md)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import image_corpus as corpus
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import running_app, service_settings
from test_hints import np_hex_to_ab

from models.boxes import Detections
from models.checkpoints import (
    HINTS_MARKER,
    CheckpointError,
    load_networks,
    write_hints_marker,
)
from models.hints import Hint, hinted_input, instcolor_hint_planes, sample_hints
from models.pipeline import ColorizeOptions, Colorizer, OptionsError
from training.stages import HintSampler

PNG = {"content-type": "image/png"}


@pytest.fixture
def hinted_checkpoints(tiny_checkpoints: Path, tmp_path: Path) -> Path:
    """The tiny seeded checkpoints with the marker a hint-trained run writes."""
    folder = tmp_path / "hinted"
    shutil.copytree(tiny_checkpoints, folder)
    write_hints_marker(folder, 0.125)
    return folder


def test_the_hints_marker_decides_whether_the_networks_take_hints(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints, folder)
    assert load_networks(folder).takes_hints is False
    write_hints_marker(folder, 0.125)
    assert json.loads((folder / HINTS_MARKER).read_text())["hint_sample_p"] == 0.125
    assert load_networks(folder).takes_hints is True
    (folder / HINTS_MARKER).write_text("{}")
    with pytest.raises(CheckpointError, match="hint_sample_p"):
        load_networks(folder)
    write_hints_marker(folder, 1.0)  # a run without hints removes a stale marker
    assert not (folder / HINTS_MARKER).exists()
    assert load_networks(folder).takes_hints is False


def planes(marks: list[tuple[int, int, int, int, float, float]]) -> np.ndarray:
    """(3, 256, 256) hand-built [ab / 110, mask - 0.5] from (top, bottom, left, right, a, b)."""
    out = np.zeros((3, 256, 256), np.float32)
    out[2] = -0.5
    for top, bottom, left, right, a, b in marks:
        out[0, top:bottom, left:right] = np.float32(a) / np.float32(110)
        out[1, top:bottom, left:right] = np.float32(b) / np.float32(110)
        out[2, top:bottom, left:right] = 0.5
    return out


def capture_inputs(colorizer: Colorizer) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {"instance": [], "fusion": [], "full_image": []}
    for name, net in (("instance", colorizer.instance_net), ("fusion", colorizer.fusion_net),
                      ("full_image", colorizer.full_image_net)):  # fmt: skip

        def hook(_module: Any, args: tuple[Any, ...], name: str = name) -> None:
            seen[name].append(args[0].detach().clone().contiguous())

        net.register_forward_pre_hook(hook)
    return seen


def test_the_hinted_network_inputs_equal_hand_built_tensors(hinted_checkpoints: Path) -> None:
    colorizer = Colorizer.load(hinted_checkpoints, precision="fp32", device_crops=False)
    assert colorizer.takes_hints and colorizer.describe()["takes_hints"] is True
    photo = corpus.gray(100, 80, seed=3).convert("RGB")
    hints = (
        Hint(30, 40, 40.0, -30.0, 3),  # in box A only
        Hint(55, 10, -20.0, 50.0, 5),  # in box B only
        Hint.from_color(55, 30, "#3a7bd5", 1),  # in both boxes
    )
    # the colour's ab is the product's float32 conversion (its float64 check: test_hints.py)
    a3, b3 = hints[2].a, hints[2].b
    assert np.allclose((a3, b3), np_hex_to_ab("#3a7bd5"), atol=1e-4)
    box_a, box_b = (10, 20, 60, 70), (50, 0, 100, 40)
    with_boxes = Detections.from_boxes([box_a, box_b])
    options = [
        ColorizeOptions(resolution="network", boxes=with_boxes, hints=hints),
        ColorizeOptions(resolution="network", max_instances=0, hints=hints),
        ColorizeOptions(resolution="network", boxes=Detections.from_boxes([box_a])),  # no hints
    ]
    seen = capture_inputs(colorizer)
    hinted = colorizer.colorize([photo] * 3, options)
    assert [r.boxes for r in hinted] == [[box_a, box_b], [], [box_a]]
    plain = colorizer.colorize([photo] * 3, [ColorizeOptions(
        resolution=o.resolution, boxes=o.boxes, max_instances=o.max_instances) for o in options
    ])  # fmt: skip
    (inst_h, inst_p), (fuse_h, fuse_p), (full_h, full_p) = (
        seen["instance"], seen["fusion"], seen["full_image"]
    )  # fmt: skip

    # worked out by hand. Full image 100x80 -> 256: column floor(x * 2.56), row floor(y * 3.2)
    # (30, 40) -> col 76, row 128, size 3; (55, 10) -> col 140, row 32, size 5;
    # (55, 30) -> col 140, row 96, size 1
    full = planes([(127, 130, 75, 78, 40.0, -30.0), (30, 35, 138, 143, -20.0, 50.0),
                   (96, 97, 140, 141, a3, b3)])  # fmt: skip
    # box A (10, 20)-(60, 70), 50x50 -> 256: (20, 20) -> col/row 102; (45, 10) -> col 230, row 51
    crop_a = planes([(101, 104, 101, 104, 40.0, -30.0), (51, 52, 230, 231, a3, b3)])
    # box B (50, 0)-(100, 40), 50x40: (5, 10) -> col 25, row 64, size 5; (5, 30) -> col 25, row 192
    crop_b = planes([(62, 67, 23, 28, -20.0, 50.0), (192, 193, 25, 26, a3, b3)])
    automatic = planes([])

    # crops: A, B of image 0, A of image 2, one padding row (bucket 4)
    assert inst_h.shape == (4, 4, 256, 256)
    want = np.stack([crop_a, crop_b, automatic, automatic])
    np.testing.assert_array_equal(inst_h[:, 1:].numpy(), want)
    np.testing.assert_array_equal(inst_p[:, 1:].numpy(), np.stack([automatic] * 4))
    assert torch.equal(inst_h[:, :1], inst_p[:, :1])  # the same L
    np.testing.assert_array_equal(fuse_h[:, 1:].numpy(), np.stack([full, automatic]))
    np.testing.assert_array_equal(full_h[:, 1:].numpy(), full[None])
    np.testing.assert_array_equal(fuse_p[:, 1:].numpy(), np.stack([automatic] * 2))
    assert torch.equal(fuse_h[:, :1], fuse_p[:, :1]) and torch.equal(full_h[:, :1], full_p[:, :1])

    # the hints reach the output; the image without hints is unchanged by the others' hints
    def pixels(result: Any) -> np.ndarray:
        return np.asarray(result.image, dtype=int)

    assert np.abs(pixels(hinted[0]) - pixels(plain[0])).max() > 0
    assert np.abs(pixels(hinted[1]) - pixels(plain[1])).max() > 0
    assert np.array_equal(pixels(hinted[2]), pixels(plain[2]))


def test_a_user_hint_where_training_sampled_one_gives_the_training_input() -> None:
    """Training's input (``HintSampler``: one sampled patch of side 3) and the pipeline's
    (``instcolor_hint_planes`` of a user hint at that patch's centre with its mean ab) both go
    through ``hinted_input``: the same [L, ab / 110, mask - 0.5], +0.5 hinted, -0.5 elsewhere."""
    torch.manual_seed(0)
    ab = torch.rand(1, 2, 256, 256) * 0.4 - 0.2
    l_norm = torch.rand(1, 1, 256, 256) - 0.5
    sampler = HintSampler(0.5, seed=7)
    sampler.active = True
    generator = torch.Generator().manual_seed(7)
    while True:  # a seed-7 draw with exactly one patch of side 3, found by replaying the sampler
        state = sampler.generator.get_state()
        trained = sampler.network_input(l_norm, ab)
        rows, cols = torch.nonzero(trained[0, 3] > 0, as_tuple=True)
        if (
            len(rows) == 9
            and int(rows.max() - rows.min()) == 2
            and int(cols.max() - cols.min()) == 2
        ):
            break
    generator.set_state(state)
    hint, mask = sample_hints(ab, 0.5, generator)
    assert torch.equal(trained[:, 1:3], hint) and torch.equal(trained[:, 3:], mask - 0.5)
    top, left = int(rows.min()), int(cols.min())
    a, b = (trained[0, 1:3, top, left] * 110).tolist()
    user = Hint(left + 1.5, top + 1.5, a, b, 3)  # 256x256 input: the point's pixel is the centre
    hint_ab, hint_mask = instcolor_hint_planes([user], 256, 256, 256)
    pipeline = hinted_input(l_norm, hint_ab[None], hint_mask[None])
    torch.testing.assert_close(pipeline, trained, rtol=0, atol=1e-7)
    assert torch.equal(pipeline[:, 3], trained[:, 3])
    assert set(pipeline[:, 3].unique().tolist()) == {-0.5, 0.5}


def test_the_released_instcolor_still_refuses_hints_and_says_how_to_enable(
    tiny_colorizer: Colorizer,
) -> None:
    with pytest.raises(OptionsError, match="train --hint-sample-p"):
        tiny_colorizer.prepare(
            Image.new("RGB", (32, 32)), ColorizeOptions(hints=(Hint(1, 1, 0, 0),))
        )


def test_a_hinted_point_outside_the_image_is_refused(hinted_checkpoints: Path) -> None:
    colorizer = Colorizer.load(hinted_checkpoints, precision="fp32")
    with pytest.raises(OptionsError, match="outside the image"):
        colorizer.prepare(Image.new("RGB", (32, 32)), ColorizeOptions(hints=(Hint(32, 1, 0, 0),)))


@pytest.mark.parametrize("trained_with_hints", [True, False])
async def test_the_api_takes_hints_for_a_hint_trained_instcolor_only(
    trained_with_hints: bool, hinted_checkpoints: Path, tiny_checkpoints: Path
) -> None:
    folder = hinted_checkpoints if trained_with_hints else tiny_checkpoints
    settings = service_settings(folder, models="instcolor")
    hints = quote(json.dumps([{"x": 10, "y": 12, "color": "#3a7bd5", "size": 5}]))
    image = corpus.png(48, 40)
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
        assert listed["instcolor"]["takes_hints"] is trained_with_hints
        query = f"resolution=network&format=png&boxes={quote('[[4, 4, 30, 30]]')}&hints={hints}"
        answer = await client.post(f"/colorize?{query}", content=image, headers=PNG)
        plain = await client.post(
            f"/colorize?resolution=network&format=png&boxes={quote('[[4, 4, 30, 30]]')}",
            content=image,
            headers=PNG,
        )
    assert plain.status_code == 200, plain.text
    if trained_with_hints:
        assert answer.status_code == 200, answer.text
        got = np.asarray(Image.open(io.BytesIO(answer.content)), dtype=int)
        unhinted = np.asarray(Image.open(io.BytesIO(plain.content)), dtype=int)
        assert np.abs(got - unhinted).max() > 0
    else:
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        detail = answer.json()["detail"]
        assert "takes no colour hints" in detail and "hints.json" in detail


def test_colorize_hints_drives_a_hint_trained_instcolor_and_refuses_the_released(
    tmp_path: Path,
    hinted_checkpoints: Path,
    tiny_checkpoints: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli import main

    corpus.gray(64, 48, seed=5).save(tmp_path / "a.png")
    hints = [{"x": 10, "y": 30, "color": "#3a7bd5", "size": 4}]
    (tmp_path / "hints.json").write_text(json.dumps(hints))
    (tmp_path / "boxes.json").write_text(json.dumps({"a.png": {"boxes": [[4, 10, 40, 44]]}}))
    common = ["--no-detector", "--precision", "fp32", "--no-progress", "--boxes",
              str(tmp_path / "boxes.json"), "--hints", str(tmp_path / "hints.json")]  # fmt: skip
    code = main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"),
                 "--checkpoints", str(hinted_checkpoints), *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    colorizer = Colorizer.load(hinted_checkpoints, precision="fp32")
    options = ColorizeOptions(
        boxes=Detections.from_boxes([[4, 10, 40, 44]]),
        hints=tuple(Hint.from_dict(h) for h in hints),  # type: ignore[arg-type]
    )
    (want,) = colorizer.colorize([Image.open(tmp_path / "a.png")], options)
    got = np.asarray(Image.open(tmp_path / "out" / "a.png"), dtype=int)
    assert np.abs(got - np.asarray(want.image, dtype=int)).max() <= 1
    code = main(["colorize", str(tmp_path / "a.png"), "-o", str(tmp_path / "out2"),
                 "--checkpoints", str(tiny_checkpoints), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "takes no colour hints" in err and "hints.json" in err


def test_evaluate_hints_scores_a_hint_trained_instcolor_and_refuses_the_released(
    tmp_path: Path,
    hinted_checkpoints: Path,
    tiny_checkpoints: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from service.cli import main

    truth = tmp_path / "truth"
    truth.mkdir()
    rng = np.random.default_rng(1)
    field = np.kron(rng.random((4, 4, 3)), np.ones((12, 12, 1)))  # flat colour blocks, 48x48
    Image.fromarray((field * 200 + 30).astype(np.uint8)).save(truth / "t0.png")
    common = ["--no-detector", "--precision", "fp32", "--no-progress", "--hints", "3"]
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "report"), "--checkpoints",
                 str(hinted_checkpoints), *common])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["config"]["hints"] == 3
    code = main(["evaluate", str(truth), "-o", str(tmp_path / "r2"), "--checkpoints",
                 str(tiny_checkpoints), *common])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "takes no colour hints" in err and "hints.json" in err


def test_a_resumed_hint_run_draws_the_same_hints_as_an_uninterrupted_one(
    tiny_checkpoints: Path, tmp_path: Path
) -> None:
    """Stop after 2 steps, resume to 3: the hint generator's state comes back from state.pt, so
    the weights equal the uninterrupted run's; a resume with that state removed (a fresh hint
    stream, as before it was stored) ends elsewhere, so the comparison can fail."""
    from test_training import make_data, options, state_of, write_photos

    from training.loop import train

    data = make_data(tmp_path, write_photos(tmp_path / "photos"), 2, 0)
    common = {"batch_size": 1, "epochs": 1, "decay_epochs": 2, "log_every": 1, "lr": 1e-3,
              "hint_sample_p": 0.3}  # fmt: skip
    runs = {name: tmp_path / name for name in ("whole", "parts", "fresh")}
    assert train(options(data, tiny_checkpoints, runs["whole"], "instance", max_steps=3,
                         **common)) == 0  # fmt: skip
    for name in ("parts", "fresh"):
        assert train(options(data, tiny_checkpoints, runs[name], "instance", max_steps=2,
                             **common)) == 0  # fmt: skip
    state = torch.load(runs["fresh"] / "state.pt", weights_only=False)
    assert len(state["hint_rng"]) == 1 and state["hint_rng"][0] is not None
    del state["hint_rng"]
    torch.save(state, runs["fresh"] / "state.pt")
    for name in ("parts", "fresh"):
        assert train(options(data, tiny_checkpoints, runs[name], "instance", max_steps=3,
                             resume=True, **common)) == 0  # fmt: skip
    saved = {n: torch.load(runs[n] / "state.pt", weights_only=False)["hint_rng"] for n in runs}
    assert torch.equal(saved["whole"][0], saved["parts"][0])
    assert not torch.equal(saved["whole"][0], saved["fresh"][0])
    whole, parts, fresh = (state_of(runs[n] / "checkpoints")["latest_net_G.pth"] for n in runs)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert not all(torch.equal(whole[k], fresh[k]) for k in whole)
    assert load_networks(runs["parts"] / "checkpoints").takes_hints
