"""Strict loading of the official and MMagic layouts, and every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from weight_files import random_networks, write_mmagic, write_official

from models.checkpoints import CheckpointError, load_networks, missing_files


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_legacy_layout_loads_strictly(tiny_checkpoints: Path) -> None:
    nets = load_networks(tiny_checkpoints)
    expected = random_networks(8, seed=0)
    assert nets.layout == "official" and nets.width == 8
    for net, name in ((nets.instance, "latest_net_G.pth"), (nets.fusion, "latest_net_GF.pth"),
                      (nets.full_image, "latest_net_GComp.pth")):  # fmt: skip
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected[name].items())
        assert not net.training
    assert len(nets.files) == 3 and all(len(f.sha256) == 64 for f in nets.files)
    assert nets.version.startswith("instcolor-")


def test_official_width_files_load(tmp_path: Path) -> None:
    nets = load_networks(write_official(tmp_path / "ck", width=64, seed=5, legacy=False))
    assert nets.width == 64


def test_unzipped_folder_layout_is_found(tmp_path: Path) -> None:
    write_official(tmp_path / "checkpoints" / "coco_finetuned_mask_256_ffs", width=8)
    assert load_networks(tmp_path).width == 8
    assert missing_files(tmp_path) == []


def test_mmagic_file_loads_the_same_networks(tiny_checkpoints: Path, tiny_mmagic: Path) -> None:
    official, mmagic = load_networks(tiny_checkpoints), load_networks(tiny_mmagic)
    assert mmagic.layout == "mmagic"
    assert same_weights(official.instance, mmagic.instance)
    assert same_weights(official.fusion, mmagic.fusion)
    assert same_weights(official.full_image, mmagic.full_image)


def test_module_prefix_on_every_file_is_tolerated(tmp_path: Path) -> None:
    for name, state in random_networks(8).items():
        torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / name)
    assert load_networks(tmp_path).width == 8


def test_missing_num_batches_tracked_is_filled_in(tmp_path: Path) -> None:
    for name, state in random_networks(8).items():
        torch.save(
            {k: v for k, v in state.items() if "num_batches_tracked" not in k}, tmp_path / name
        )
    assert load_networks(tmp_path).width == 8


@pytest.fixture
def official_copy(tmp_path: Path) -> Path:
    return write_official(tmp_path / "ck", width=8)


def test_missing_file_names_it_and_the_fetch_command(official_copy: Path) -> None:
    (official_copy / "latest_net_GF.pth").unlink()
    with pytest.raises(CheckpointError, match=r"latest_net_GF\.pth.*fetch-weights"):
        load_networks(official_copy)


def test_truncated_file(official_copy: Path) -> None:
    path = official_copy / "latest_net_G.pth"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"latest_net_G\.pth: cannot read checkpoint"):
        load_networks(official_copy)


def test_not_a_checkpoint(official_copy: Path) -> None:
    (official_copy / "latest_net_GComp.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"latest_net_GComp\.pth"):
        load_networks(official_copy)


def test_missing_and_unexpected_keys_are_named(official_copy: Path) -> None:
    path = official_copy / "latest_net_G.pth"
    state = torch.load(path, weights_only=True)
    state["model_extra.weight"] = state.pop("model4.2.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_networks(official_copy)
    message = str(info.value)
    assert "latest_net_G.pth" in message
    assert "missing keys: model4.2.weight" in message
    assert "unexpected keys: model_extra.weight" in message


def test_wrong_shape_is_named(official_copy: Path) -> None:
    path = official_copy / "latest_net_GF.pth"
    state = torch.load(path, weights_only=True)
    state["module.model_out.0.weight"] = torch.zeros(3, 16, 1, 1)
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"latest_net_GF\.pth: wrong shapes: model_out\.0\.weight"
    ):
        load_networks(official_copy)


def test_mixed_widths_are_refused(official_copy: Path) -> None:
    torch.save(random_networks(16)["latest_net_GComp.pth"], official_copy / "latest_net_GComp.pth")
    with pytest.raises(CheckpointError, match="different widths"):
        load_networks(official_copy)


def test_mmagic_missing_key_is_named_with_its_network(tmp_path: Path) -> None:
    path = write_mmagic(tmp_path / "m.pth")
    data = torch.load(path, weights_only=True)
    del data["state_dict"]["image_model.model8up.weight"]
    torch.save(data, path)
    with pytest.raises(
        CheckpointError, match=r"\[image_model\.\*\].*missing keys: model8up\.0\.weight"
    ):
        load_networks(path)


def test_mmagic_foreign_prefix_is_refused(tmp_path: Path) -> None:
    path = write_mmagic(tmp_path / "m.pth")
    data = torch.load(path, weights_only=True)
    data["state_dict"]["generator.conv.weight"] = torch.zeros(1)
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=r"generator\.conv\.weight"):
        load_networks(path)


def test_pickled_code_is_refused(official_copy: Path) -> None:
    """weights_only=True: a file that would run code on load is rejected, not executed."""

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    # torch.save's own format and pickle protocol, as a tampered checkpoint would have
    torch.save({"model1.0.weight": Evil()}, official_copy / "latest_net_G.pth")
    with pytest.raises(CheckpointError, match=r"latest_net_G\.pth"):
        load_networks(official_copy)
