"""``fetch-weights --model`` / ``--all-models`` / ``--from`` for the single-file models: a real
download from a local HTTP server, a hand-brought copy checked against the official sha256, and
Larsson's Caffe HDF5 converted on install; each installed file is then loaded strictly."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_larsson_eccv16 import write_caffe_h5
from weight_files import write_zoo_model

from models.registry import get_model
from service.cli import main
from service.weights.fetch import fetch_model
from service.weights.sources import RemoteFile, WeightSources


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_is_downloaded_checked_and_loaded(
    tmp_path: Path, file_server: tuple[str, Path]
) -> None:
    base, served = file_server
    made = write_zoo_model(tmp_path / "made", "zhang-siggraph17", seed=3)
    (served / made.name).write_bytes(made.read_bytes())
    digest = hashlib.sha256(made.read_bytes()).hexdigest()
    sources = dataclasses.replace(
        WeightSources.default(),
        models={"zhang-siggraph17": (RemoteFile(base + made.name, made.name, digest),)},
    )
    weights = tmp_path / "weights"
    [item] = fetch_model("zhang-siggraph17", weights, sources=sources, progress=False)
    assert item.downloaded and item.sha256 == digest
    assert item.path == weights / "zhang-siggraph17" / made.name
    assert item.path.read_bytes() == made.read_bytes()
    again = fetch_model("zhang-siggraph17", weights, sources=sources, progress=False)
    assert not again[0].downloaded  # present and verified: kept


def test_from_refuses_a_copy_that_is_not_the_official_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = write_zoo_model(tmp_path / "copy", "zhang-eccv16", seed=1)  # random, not official
    weights = tmp_path / "weights"
    code = main(["fetch-weights", "--model", "zhang-eccv16", "--from", str(copy),
                 "--weights-dir", str(weights), "--no-progress"])  # fmt: skip
    assert code == 1
    assert "is not that of the official" in capsys.readouterr().err
    assert not (weights / "zhang-eccv16").exists() or not any((weights / "zhang-eccv16").iterdir())


def test_from_converts_larsson_caffe_hdf5(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5 = tmp_path / "autocolorize.caffemodel.h5"
    write_caffe_h5(h5, seed=2)
    weights = tmp_path / "weights"
    code = main(["fetch-weights", "--model", "larsson-eccv16", "--from", str(h5),
                 "--weights-dir", str(weights), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (path,) = get_model("larsson-eccv16").weight_paths(weights)
    assert path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in capsys.readouterr().out


def test_from_a_non_hdf5_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "autocolorize.caffemodel.h5"
    bad.write_bytes(b"not hdf5 at all")
    code = main(["fetch-weights", "--model", "larsson-eccv16", "--from", str(bad),
                 "--weights-dir", str(tmp_path / "w"), "--no-progress"])  # fmt: skip
    assert code == 1
    assert "HDF5" in capsys.readouterr().err
    assert get_model("larsson-eccv16").missing_files(tmp_path / "w")  # nothing installed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "larsson"], "unknown model 'larsson'"),
        (["--from", "x.pth"], "for instcolor give the folder of the unzipped checkpoints.zip"),
        (["--from", ".", "--variant", "mmagic"], "installs the official files"),
        (["--model", "zhang-eccv16,zhang-siggraph17", "--from", "x.pth"], "--from installs the"),
        (["--model", "zhang-eccv16", "--from", "missing.pth"], "no such file"),
        (["--model", "li-dcnn"], "li-dcnn has no published weights; train them with"),
        (["--model", "zhao-pixelated"], "zhao-pixelated has no published weights; train them with"),
    ],
)
def test_usage_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fetch-weights", "--weights-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_from_installs_instcolor_from_the_unzipped_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--from DIR`` for instcolor: the three files of an unzipped checkpoints.zip are copied to
    where the settings look, each printed with the sha256 of its source, and they load."""
    from weight_files import write_official

    from models.checkpoints import NETWORK_FILES, OFFICIAL_VARIANT, load_networks

    unzipped = tmp_path / "download"
    write_official(unzipped / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=6)
    (unzipped / "checkpoints" / "other_variant").mkdir()  # the zip has more; only ours is taken
    weights = tmp_path / "weights"
    code = main(["fetch-weights", "--from", str(unzipped), "--weights-dir", str(weights),
                 "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    target = weights / "checkpoints" / OFFICIAL_VARIANT
    for spec in NETWORK_FILES:
        source = unzipped / "checkpoints" / OFFICIAL_VARIANT / spec.filename
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        assert (target / spec.filename).read_bytes() == source.read_bytes()
        assert f"installed  {target / spec.filename}  sha256 {digest}" in out
    assert "no detector file in that folder" in out
    assert sorted(p.name for p in weights.rglob("*") if p.is_file()) == sorted(
        spec.filename for spec in NETWORK_FILES
    )  # no temporary file left
    assert len(load_networks(weights / "checkpoints").files) == 3
    # the folder of the three files itself works too, and a second run replaces them in place
    assert main(["fetch-weights", "--model", "instcolor", "--from",
                 str(unzipped / "checkpoints" / OFFICIAL_VARIANT), "--weights-dir", str(weights),
                 "--detector", "none", "--no-progress"]) == 0  # fmt: skip


def test_from_refuses_instcolor_folders_that_are_not_the_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from weight_files import write_official

    from models.checkpoints import NETWORK_FILES, OFFICIAL_VARIANT

    empty = tmp_path / "empty"
    empty.mkdir()
    weights = tmp_path / "weights"
    args = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["fetch-weights", "--from", str(empty), *args]) == 1
    assert "unzip the authors' checkpoints.zip" in capsys.readouterr().err

    broken = tmp_path / "broken"
    write_official(broken, width=8, seed=7)
    (broken / NETWORK_FILES[0].filename).write_bytes(b"not a torch file")
    assert main(["fetch-weights", "--from", str(broken), *args]) == 1
    assert "copied but does not load, removed it" in capsys.readouterr().err
    target = weights / "checkpoints" / OFFICIAL_VARIANT
    assert not any(target.iterdir())  # nothing unloadable left where the settings look

    good = tmp_path / "good"
    write_official(good, width=8, seed=8)
    (good / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth").write_bytes(b"some other file")
    assert main(["fetch-weights", "--from", str(good), *args]) == 1
    assert "is not that of the official maskrcnn" in capsys.readouterr().err
    assert not (weights / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth").exists()


@pytest.mark.slow
def test_larsson_fetched_from_a_copy_then_served_by_colorize(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's path for Larsson end to end: --from converts the Caffe file, then
    ``colorize --model larsson-eccv16`` runs the 512 px network through the product's pipeline
    (one image: about a minute on 2 CPU cores) and writes the photo at its own size,
    equal to the library call."""
    import numpy as np
    from PIL import Image

    from models.zoo import load_colorizer

    h5 = tmp_path / "autocolorize.caffemodel.h5"
    write_caffe_h5(h5, seed=4)
    weights = tmp_path / "weights"
    assert main(["fetch-weights", "--model", "larsson-eccv16", "--from", str(h5),
                 "--weights-dir", str(weights), "--no-progress", "--no-verify-load"]) == 0  # fmt: skip
    photo = Image.linear_gradient("L").resize((90, 60))
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = main(["colorize", str(tmp_path / "photo.png"), "-o", str(out), "--model",
                 "larsson-eccv16", "--no-progress", "--no-detector", "--precision", "fp32",
                 "--weights-dir", str(weights)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    written = np.array(Image.open(out / "photo.png").convert("RGB"))
    assert written.shape == (60, 90, 3)
    pipeline = load_colorizer("larsson-eccv16", weights, precision="fp32")
    (want,) = pipeline.colorize([photo.convert("RGB")])
    assert np.array_equal(written, np.array(want.image))
