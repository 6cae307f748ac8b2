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
        (["--from", "x.pth"], "--from installs one file of one single-file model"),
        (["--model", "zhang-eccv16,zhang-siggraph17", "--from", "x.pth"], "--from installs one"),
        (["--model", "zhang-eccv16", "--from", "missing.pth"], "no such file"),
        (["--model", "zhao-pixelated"], "no published weights: train them"),
    ],
)
def test_usage_errors(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fetch-weights", "--weights-dir", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err


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
