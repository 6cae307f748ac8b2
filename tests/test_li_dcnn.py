"""li-dcnn (Li et al.): blocks against the paper's description, strict loading, the Zhang
initialisation, the losses, the labels, and a tiny CPU train run that resumes and serves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from weight_files import write_li_dcnn, write_zoo_model

from models.checkpoints import CheckpointError
from models.li_dcnn import FC_WIDTHS, FILENAME, LiDCNN, grid_bin_centres, load_li_dcnn
from models.registry import get_model
from models.zhang_eccv16 import ZhangECCV16
from models.zoo import load_colorizer
from service.cli import main
from training.li_dcnn import image_labels, initial_network, read_labels_file
from training.li_losses import colour_loss, rebalancing_weights, target_bins
from training.loop import TrainingError
from training.manifest import ManifestRow
from training.run_files import read_metrics


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k + c_out


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


# The paper's Figure 2 as module -> (parameters, output shape for one 256x256 image), written
# out from the description: ECCV16's conv1-conv5, down sample by 2, fc1-fc3, classifier, fc3 tiled
# and concatenated to conv5 (512 + 256 channels into conv6), conv6-conv8, conv9 to 313 bins.
EXPECTED = {
    "model1": (conv(1, 64) + conv(64, 64) + bn(64), (64, 128, 128)),
    "model2": (conv(64, 128) + conv(128, 128) + bn(128), (128, 64, 64)),
    "model3": (conv(128, 256) + 2 * conv(256, 256) + bn(256), (256, 32, 32)),
    "model4": (conv(256, 512) + 2 * conv(512, 512) + bn(512), (512, 32, 32)),
    "model5": (3 * conv(512, 512) + bn(512), (512, 32, 32)),
    "class_pool": (0, (512, 16, 16)),
    "fc1": (linear(512 * 16 * 16, 1024), (1024,)),
    "fc2": (linear(1024, 512), (512,)),
    "fc3": (linear(512, 256), (256,)),
    "classifier": (linear(256, 91), (91,)),
    "model6": (conv(768, 512) + 2 * conv(512, 512) + bn(512), (512, 32, 32)),
    "model7": (3 * conv(512, 512) + bn(512), (512, 32, 32)),
    "model8": (512 * 256 * 16 + 256 + 2 * conv(256, 256), (256, 64, 64)),
    "model9": (conv(256, 313, 1), (313, 64, 64)),
    "model_out": (313 * 2, None),
}


@pytest.mark.slow
def test_blocks_match_the_papers_description() -> None:
    network = LiDCNN().eval()
    assert FC_WIDTHS == (1024, 512, 256)
    for name, (params, _) in EXPECTED.items():
        got = sum(p.numel() for p in network.get_submodule(name).parameters())
        assert got == params, name
    assert sum(p.numel() for p in network.parameters()) == sum(p for p, _ in EXPECTED.values())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        network.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name in EXPECTED
        if name != "model_out"
    ]
    with torch.no_grad():
        ab = network.predict_ab(torch.full((1, 1, 256, 256), 50.0))
    for hook in hooks:
        hook.remove()
    assert shapes == {n: s for n, (_, s) in EXPECTED.items() if s is not None}
    assert ab.shape == (1, 2, 256, 256)
    # The trunk and conv6-conv9 are ECCV16's, parameter for parameter (but conv6's fc3 inputs).
    zhang = sum(p.numel() for p in ZhangECCV16().parameters())
    new = sum(EXPECTED[n][0] for n in ("fc1", "fc2", "fc3", "classifier")) + 256 * 512 * 9
    assert sum(p.numel() for p in network.parameters()) == zhang + new


def test_input_must_be_256() -> None:
    with pytest.raises(ValueError, match="256x256"):
        LiDCNN().predict_ab(torch.zeros(1, 1, 128, 128))


def test_bin_centres_rule() -> None:
    centres = grid_bin_centres()
    assert centres.shape == (313, 2)
    assert len({tuple(c) for c in centres.tolist()}) == 313
    assert torch.all(centres % 10 == 0)
    assert {0.0} <= set(centres[:, 0].tolist()) and centres.abs().max() <= 110


def annealed_mean(centres: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """ECCV16's annealed mean written out: exp(z / T) / sum, expectation of the centres, x4."""
    z = logits.double() / t
    p = torch.exp(z - z.amax(dim=1, keepdim=True))
    p = p / p.sum(dim=1, keepdim=True)
    ab = torch.einsum("qc,nqhw->nchw", centres.double(), p).float()
    return torch.nn.functional.interpolate(ab, scale_factor=4, mode="bilinear")


@pytest.mark.slow
def test_strict_load_of_a_seeded_file_serves_and_decodes(tmp_path: Path) -> None:
    path = write_li_dcnn(tmp_path / "w", seed=3)
    assert path == tmp_path / "w" / "li-dcnn" / FILENAME
    network = load_li_dcnn(path)
    assert not network.training and network.temperature == 0.38
    torch.testing.assert_close(network.bin_centres(), grid_bin_centres(), atol=1e-4, rtol=0)
    logits = torch.randn(1, 313, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    want = annealed_mean(network.bin_centres(), logits, 0.38)
    torch.testing.assert_close(network.decode(logits), want, atol=1e-3, rtol=0)

    colorizer = load_colorizer("li-dcnn", tmp_path / "w")
    photo = Image.fromarray(np.full((40, 56, 3), 128, dtype=np.uint8))
    (result,) = colorizer.colorize([photo])
    assert result.image.size == (56, 40)

    state = torch.load(path, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"extra\.weight"):
        load_li_dcnn(path)
    del state["extra.weight"], state["fc2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"fc2\.bias"):
        load_colorizer("li-dcnn", tmp_path / "w")


@pytest.mark.slow
def test_init_from_zhang_copies_trunk_and_conv6_9(tmp_path: Path) -> None:
    write_zoo_model(tmp_path, "zhang-eccv16", seed=5)
    zhang = get_model("zhang-eccv16").load(tmp_path)
    network = initial_network(tmp_path, 91, seed=0)
    source = zhang.state_dict()
    target = network.state_dict()
    for key, value in source.items():
        name = key.replace("model8.6.", "model9.")
        got = target[name][:, :512] if name == "model6.0.weight" else target[name]
        assert torch.equal(got, value), key
    # New layers: Gaussian N(0, 2 / fan_in) (the fc3 inputs of conv6 included), biases 0.
    for name, fan_in in (("fc1", 131072), ("fc2", 1024), ("fc3", 512), ("classifier", 256)):
        weight = target[f"{name}.weight"]
        assert abs(float(weight.std()) / math.sqrt(2 / fan_in) - 1) < 0.05, name
        assert float(weight.mean()).__abs__() < 3 * math.sqrt(2 / fan_in) / math.sqrt(
            weight.numel()
        )
        assert torch.all(target[f"{name}.bias"] == 0)
    fc3_inputs = target["model6.0.weight"][:, 512:]
    assert abs(float(fc3_inputs.std()) / math.sqrt(2 / (768 * 9)) - 1) < 0.05
    # With the fc3 inputs of conv6 silenced, the network is ECCV16: same 313 logits.
    with torch.no_grad():
        network.model6[0].weight[:, 512:] = 0
        l_norm = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(1)) - 0.5
        ours, _ = network.eval().logits(l_norm)
        theirs = zhang.logits(l_norm)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_init_without_zhang_is_gaussian_everywhere(tmp_path: Path) -> None:
    network = initial_network(None, 4, seed=0)
    torch.testing.assert_close(network.bin_centres(), grid_bin_centres(), atol=1e-4, rtol=0)
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name != "model_out":
            fan_in = module.weight[0].numel()
            assert abs(float(module.weight.detach().std()) / math.sqrt(2 / fan_in) - 1) < 0.1, name
    with pytest.raises(TrainingError, match="fetch-weights --model zhang-eccv16"):
        initial_network(tmp_path, 4, seed=0)


# -- losses ---------------------------------------------------------------------------------------


def test_target_bins_are_the_nearest_centres() -> None:
    centres = grid_bin_centres()
    ab = (torch.rand(2, 2, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.6
    bins = target_bins(ab, centres)
    assert bins.shape == (2, 4, 4)
    for n in range(2):
        for i in range(4):
            for j in range(4):
                point = ab[n, :, 4 * i, 4 * j] * 110
                distances = ((centres - point) ** 2).sum(dim=1)
                assert int(bins[n, i, j]) == int(distances.argmin())


def test_rebalancing_weights_follow_the_eccv16_rule() -> None:
    centres = grid_bin_centres()
    assert torch.equal(rebalancing_weights(None, centres), torch.ones(313))
    counts = torch.zeros(313, dtype=torch.float64)
    counts[:10] = 1000.0  # ten common bins
    counts[200] = 1.0  # one rare bin
    w = rebalancing_weights(counts, centres).double()
    # independent: smooth p with a sigma-5 Gaussian over the centres, mix with uniform, invert
    p = counts / counts.sum()
    smoothed = torch.zeros(313, dtype=torch.float64)
    for q in range(313):
        for r in range(313):
            d2 = float(((centres[q] - centres[r]) ** 2).sum())
            smoothed[q] += math.exp(-d2 / 50.0) * p[r]
    smoothed /= smoothed.sum()
    want = 1 / (0.5 * smoothed + 0.5 / 313)
    want /= (smoothed * want).sum()
    torch.testing.assert_close(w, want, atol=1e-5, rtol=1e-5)
    assert float((smoothed * w).sum()) == pytest.approx(1.0, abs=1e-6)
    assert w[200] > w[0]


def test_colour_loss_is_weighted_cross_entropy_summed_over_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 313, 3, 3, generator=g)
    bins = torch.randint(0, 313, (2, 3, 3), generator=g)
    weights = torch.rand(313, generator=g) + 0.5
    want = 0.0
    for n in range(2):
        for i in range(3):
            for j in range(3):
                z = logits[n, :, i, j].double()
                log_p = z - torch.logsumexp(z, 0)
                want -= float(weights[bins[n, i, j]]) * float(log_p[bins[n, i, j]])
    assert float(colour_loss(logits, bins, weights)) == pytest.approx(want / 2, rel=1e-5)


# -- labels ---------------------------------------------------------------------------------------


def row(path: str, labels: list[int], boxes: int | None = None) -> ManifestRow:
    n = len(labels) if boxes is None else boxes
    return ManifestRow("/r", path, 64, 64, [[0, 0, 10, 10]] * n, [0.9] * n, "train", labels)


def test_labels_from_the_detector_rule_and_from_a_file(tmp_path: Path) -> None:
    rows = [row("a.png", [18, 1]), row("b.png", []), row("c.png", [3])]
    labels, names = image_labels(rows, None)
    assert labels == [18, 0, 3] and len(names) == 91
    assert names[0] == "no object" and names[18] == "dog" and names[3] == "car"
    with pytest.raises(TrainingError, match="run prepare-data into a new folder"):
        image_labels([row("old.png", [], boxes=2)], None)
    file = tmp_path / "labels.csv"
    file.write_text("path,label\na.png,dog\n/r/b.png,cat\nc.png,dog\n", encoding="utf-8")
    assert read_labels_file(file) == {"a.png": "dog", "/r/b.png": "cat", "c.png": "dog"}
    assert image_labels(rows, file) == ([1, 0, 1], ["cat", "dog"])
    file.write_text("a.png,dog\n", encoding="utf-8")
    with pytest.raises(TrainingError, match="no label for 2 of 3"):
        image_labels(rows, file)
    file.write_text("a.png\n", encoding="utf-8")
    with pytest.raises(TrainingError, match=":1: expected 'path,label'"):
        read_labels_file(file)


# -- training -------------------------------------------------------------------------------------


def colour_photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64] / 64
    base = np.stack([200 * x + 30, 60 + 100 * y, 200 * (1 - x)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.slow
def test_tiny_train_resumes_and_serves(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    lines = ["path,label"]
    for i in range(4):
        colour_photo(i).save(photos / f"p{i}.png")
        lines.append(f"p{i}.png,{'warm' if i % 2 else 'cool'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare-data", str(photos), "--output", str(data), "--no-progress",
                 "--no-detector", "--val-fraction", "0"]) == 0  # fmt: skip
    weights = tmp_path / "w"
    write_zoo_model(weights, "zhang-eccv16", seed=1)
    flags = ["train", "--model", "li-dcnn", "--data", str(data), "--output", str(run),
             "--init", str(weights), "--labels", str(tmp_path / "labels.csv"),
             "--batch-size", "2", "--lr", "1e-4", "--log-every", "1", "--no-progress",
             "--max-steps"]  # fmt: skip
    assert main([*flags, "2"]) == 0
    assert main([*flags, "2"]) == 2  # the run exists: --resume or another --output
    assert main([*flags, "3", "--resume"]) == 0
    state = torch.load(run / "state.pt", weights_only=False)
    assert state["step"] == 3 and state["classes"] == ["cool", "warm"]
    rows = [r for r in read_metrics(run) if r.get("split") != "val"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["colour_loss"]) and math.isfinite(r["class_loss"]) for r in rows)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["prior"] == "training set" and config["classes"] == 2
    # The weights the run wrote are the network the run trained, and the zoo serves them.
    network = load_li_dcnn(run / "weights" / "li-dcnn" / FILENAME)
    for key, value in network.state_dict().items():
        assert torch.equal(value, state["network"][key]), key
    colorizer = load_colorizer("li-dcnn", run / "weights")
    (result,) = colorizer.colorize([colour_photo(9)])
    assert result.image.size == (64, 64)
    assert main(["train", "--model", "li-dcnn", "--data", str(data), "--output",
                 str(tmp_path / "r2"), "--stage", "full"]) == 2  # fmt: skip


@pytest.mark.slow
def test_evaluate_compare_includes_li_dcnn(tmp_path: Path) -> None:
    weights = tmp_path / "w"
    write_zoo_model(weights, "zhang-eccv16", seed=2)
    write_li_dcnn(weights, seed=4)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        colour_photo(i).save(photos / f"p{i}.png")
    report = tmp_path / "report"
    code = main(["evaluate", str(photos), "-o", str(report), "--no-progress", "--no-detector",
                 "--precision", "fp32", "--weights-dir", str(weights), "--compare",
                 "eccv16=--model zhang-eccv16", "li=--model li-dcnn"])  # fmt: skip
    assert code == 0
    comparison = json.loads((report / "comparison.json").read_text(encoding="utf-8"))
    assert comparison["paired_images"] == 2
    assert {r["name"] for r in comparison["metrics"]["psnr"]["rows"]} == {"eccv16", "li"}
    summary = json.loads((report / "li" / "summary.json").read_text(encoding="utf-8"))
    assert summary["config"]["model"] == "li-dcnn"


@pytest.mark.slow
async def test_served_alone_from_a_run_weights_dir(tmp_path: Path) -> None:
    """``serve --models li-dcnn --weights-dir RUN/weights``: no InstColorization files needed."""
    import io

    from service_helpers import running_app, service_settings

    weights = tmp_path / "run" / "weights"
    path = write_li_dcnn(weights, seed=6)
    settings = service_settings(weights / "checkpoints", weights_dir=weights, models="li-dcnn")
    async with running_app(settings) as (_, client):  # type: ignore[arg-type]
        listed = (await client.get("/models")).json()
        (card,) = listed["models"]
        assert card["name"] == "li-dcnn" and listed["default"] == "li-dcnn"
        assert card["files"][0]["name"] == path.name and card["uses_boxes"] is False
        buffer = io.BytesIO()
        colour_photo(3).convert("L").save(buffer, format="PNG")
        answer = await client.post(
            "/colorize?model=li-dcnn", content=buffer.getvalue(),
            headers={"content-type": "image/png"},
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-model"] == "li-dcnn"
        assert Image.open(io.BytesIO(answer.content)).size == (64, 64)


def test_width_divisor_narrows_and_loads_back(tmp_path: Path) -> None:
    """``--width-divisor``: every layer / D, read back from the file's shapes; no Zhang init."""
    network = initial_network(None, 3, seed=0, divisor=8)
    assert network.model1[0].out_channels == 8 and network.fc1.out_features == 128
    assert network.model6[0].in_channels == 64 + 32  # conv5 (512 / 8) + fc3 (256 / 8)
    path = tmp_path / "li-dcnn" / FILENAME
    path.parent.mkdir()
    torch.save(network.state_dict(), path)
    loaded = load_li_dcnn(path)
    assert loaded.divisor == 8 and loaded.num_classes == 3
    l_norm = torch.zeros(1, 1, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(l_norm)[0], network.eval().logits(l_norm)[0])
    with pytest.raises(TrainingError, match="leave out --width-divisor 8 or --init"):
        initial_network(tmp_path, 3, seed=0, divisor=8)
    with pytest.raises(ValueError, match="divisor must divide 64"):
        LiDCNN(divisor=3)
