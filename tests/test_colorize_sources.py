"""What ``colorize --engine ray`` reads, planned on the driver without Ray: URI arguments kept as
URIs, a ``file://`` URI and an ``s3://`` one (pyarrow's S3FileSystem against a local S3 server,
moto's: tests/s3_server.py) listed and read back, manifests and their per-item options."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import s3_client, s3_environment, upload_folder

from models.constants import DEFAULT_HINT_SIZE
from service.cli import build_parser, main
from service.commands.colorize_ray import read_source
from service.commands.colorize_sources import SourceError, plan_manifest, plan_uri, s3_endpoint

BASE = {"resolution": "original", "max_instances": 8, "score_threshold": 0.7, "saturation": 1.0}


@pytest.mark.parametrize(
    "given", ["file:///data/scans", "s3://bucket/scans/", "gs://bucket/a.png", "file:///x/a b.png"]
)
def test_a_uri_input_keeps_its_slashes(given: str) -> None:
    args = build_parser().parse_args(["colorize", given, "-o", "out", "--engine", "ray"])
    assert args.inputs == [given]


def test_a_path_input_is_still_a_path() -> None:
    args = build_parser().parse_args(["colorize", "scans", "C:/x.png", "-o", "out"])
    assert args.inputs == [Path("scans"), Path("C:/x.png")]


def test_a_file_uri_folder_is_listed_recursively_and_read_back(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(b"A")
    (root / "sub" / "b.jpg").write_bytes(b"B")
    (root / "notes.txt").write_bytes(b"not an image")
    (root / ".a.png.tmp.png").write_bytes(b"an atomic write's temporary")
    items = plan_uri(root.as_uri(), tmp_path / "out", ".png", BASE)
    assert [item.custom_id for item in items] == ["a.png", "sub/b.jpg"]
    assert [item.output for item in items] == [tmp_path / "out" / "a.png",
                                               tmp_path / "out" / "sub" / "b.png"]  # fmt: skip
    assert [item.source for item in items] == [(root / "a.png").as_uri(),
                                               (root / "sub" / "b.jpg").as_uri()]  # fmt: skip
    assert all(item.options == BASE for item in items)
    filesystems: dict[str, object] = {}
    assert [read_source(item.source, filesystems) for item in items] == [b"A", b"B"]
    assert list(filesystems) == ["file://"]  # one filesystem per root, kept


def test_a_file_uri_of_one_file_is_one_item(tmp_path: Path) -> None:
    (tmp_path / "one.jpg").write_bytes(b"1")
    (item,) = plan_uri((tmp_path / "one.jpg").as_uri(), tmp_path / "out", ".webp", BASE)
    assert item.custom_id == "one.jpg"
    assert item.output == tmp_path / "out" / "one.webp"


def test_a_missing_or_empty_uri_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        plan_uri((tmp_path / "absent").as_uri(), tmp_path / "out", ".png", BASE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        plan_uri((tmp_path / "empty").as_uri(), tmp_path / "out", ".png", BASE)


def write_manifest(path: Path, *entries: object) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries) + "\n", encoding="utf-8")
    return path


def test_a_manifest_plans_per_item_options_and_paths(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "batch.jsonl",
        {"custom_id": "a/one.jpg", "path": "scans/one.jpg", "saturation": 0.5},
        {"custom_id": "two", "path": "s3://bucket/two.png", "boxes": [[1, 2, 30, 40]],
         "scores": [0.9], "max_instances": 2, "model": "instcolor"},
    )  # fmt: skip
    one, two = plan_manifest(manifest, tmp_path / "out", ".png", BASE, "instcolor")
    assert (one.custom_id, one.source) == ("a/one.jpg", str(tmp_path / "scans" / "one.jpg"))
    assert one.output == tmp_path / "out" / "a" / "one.png"
    assert one.options == {**BASE, "saturation": 0.5}
    assert (two.source, two.output) == ("s3://bucket/two.png", tmp_path / "out" / "two.png")
    assert two.options["boxes"] == [[1, 2, 30, 40]]
    assert two.options["scores"] == [0.9]
    assert two.options["max_instances"] == 2


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"custom_id": "../x.png", "path": "x.png"}, "relative path without '..'"),
        ({"custom_id": "x.png", "path": "x.png", "colour": 1}, "unknown fields"),
        ({"custom_id": "x.png", "path": "x.png", "model": "zhang-eccv16"}, "not this run's model"),
        ({"custom_id": "x.png", "path": "x.png", "saturation": 3}, "saturation must be"),
        ({"custom_id": "x.png", "path": "x.png", "scores": [0.5]}, "scores without boxes"),
        ({"custom_id": "x.png"}, "path must be"),
    ],
)
def test_a_manifest_mistake_names_its_line(tmp_path: Path, entry: object, message: str) -> None:
    manifest = write_manifest(
        tmp_path / "m.jsonl", {"custom_id": "ok.png", "path": "ok.png"}, entry
    )
    with pytest.raises(SourceError, match="line 2") as caught:
        plan_manifest(manifest, tmp_path / "out", ".png", BASE, "instcolor")
    assert message in str(caught.value)


def test_manifest_items_that_would_share_an_output_are_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", {"custom_id": "a.jpg", "path": "a.jpg"},
                              {"custom_id": "a.png", "path": "a.png"})  # fmt: skip
    with pytest.raises(SourceError, match="same output file"):
        plan_manifest(manifest, tmp_path / "out", ".png", BASE, "instcolor")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"hints": [{"x": 1, "y": 1, "color": "blue"}]}, "hint 0.color"),
        ({"hints": {"x": 1}}, "hints must be a JSON list"),
        ({"samples": 0}, "samples must be an integer from 1 to 8"),
        ({"samples": 2.0}, "samples must be an integer"),
        ({"seed": -1}, "seed must be an integer from 0 to 2**63 - 1"),
        ({"seed": True}, "seed must be an integer"),
    ],
)
def test_manifest_hints_samples_and_seed_are_checked(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    manifest = write_manifest(
        tmp_path / "m.jsonl", {"custom_id": "x.png", "path": "x.png", **entry}
    )
    with pytest.raises(SourceError, match="line 1") as caught:
        plan_manifest(manifest, tmp_path / "out", ".png", BASE, "zhao-pixelated")
    assert message in str(caught.value)


def test_manifest_hints_samples_and_seed_are_item_options(tmp_path: Path) -> None:
    hints = [{"x": 3, "y": 4.5, "color": "#3a7bd5"}, {"x": 0, "y": 0, "ab": [10, -20], "size": 3}]
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        {"custom_id": "a.png", "path": "a.png", "hints": hints},
        {"custom_id": "b.png", "path": "b.png", "samples": 3, "seed": 2**63 - 1},
    )
    a, b = plan_manifest(manifest, tmp_path / "out", ".png", BASE, "zhao-pixelated")
    # validated as the API validates them: the default size filled in, nothing else changed
    assert a.options == {**BASE, "hints": [{**hints[0], "size": DEFAULT_HINT_SIZE}, hints[1]]}
    assert b.options == {**BASE, "samples": 3, "seed": 2**63 - 1}


# -- s3:// through pyarrow's S3FileSystem, against a local S3 server -----------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server; the environment points the AWS SDK at it (``AWS_ENDPOINT_URL_S3``)."""
    pytest.importorskip("moto")
    with s3_environment(monkeypatch, "AWS_ENDPOINT_URL_S3") as endpoint:
        yield endpoint


def test_the_s3_endpoint_is_the_aws_sdks_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://all:1")
    assert s3_endpoint() == "http://all:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    assert s3_endpoint() == "http://s3-only:2"  # the service-specific one wins, as in the SDKs


def test_an_s3_prefix_is_listed_and_read_through_pyarrows_s3_filesystem(
    tmp_path: Path, s3: str
) -> None:
    import pyarrow.fs as pafs

    local = tmp_path / "scans"
    (local / "sub").mkdir(parents=True)
    (local / "a.png").write_bytes(b"A")
    (local / "sub" / "b.jpg").write_bytes(b"B")
    (local / "notes.txt").write_bytes(b"not an image")
    upload_folder(s3, local, "archive", "roll1")
    s3_client(s3).put_object(Bucket="archive", Key="roll2/c.png", Body=b"C")  # not below roll1

    items = plan_uri("s3://archive/roll1/", tmp_path / "out", ".png", BASE)
    assert [item.custom_id for item in items] == ["a.png", "sub/b.jpg"]
    assert [item.source for item in items] == ["s3://archive/roll1/a.png",
                                               "s3://archive/roll1/sub/b.jpg"]  # fmt: skip
    assert [item.output for item in items] == [tmp_path / "out" / "a.png",
                                               tmp_path / "out" / "sub" / "b.png"]  # fmt: skip
    filesystems: dict[str, object] = {}
    assert [read_source(item.source, filesystems) for item in items] == [b"A", b"B"]
    (filesystem,) = filesystems.values()
    assert isinstance(filesystem, pafs.S3FileSystem) and list(filesystems) == ["s3://archive"]
    (one,) = plan_uri("s3://archive/roll2/c.png", tmp_path / "out", ".png", BASE)
    assert (one.custom_id, one.source) == ("c.png", "s3://archive/roll2/c.png")


def test_a_missing_s3_bucket_or_key_is_a_usage_error_naming_it(
    tmp_path: Path, s3: str, zoo_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found while planning, before any Ray starts: exit code 2 and what is missing."""
    s3_client(s3).create_bucket(Bucket="archive")
    s3_client(s3).put_object(Bucket="archive", Key="roll1/a.png", Body=b"A")
    common = ["-o", str(tmp_path / "out"), "--engine", "ray", "--model", "zhang-eccv16",
              "--weights-dir", str(zoo_weights), "--no-progress"]  # fmt: skip
    assert main(["colorize", "s3://no-such-bucket/roll1/", *common]) == 2
    error = capsys.readouterr().err
    assert "s3://no-such-bucket/roll1/: no such bucket 'no-such-bucket'" in error
    assert f"endpoint {s3}" in error
    assert main(["colorize", "s3://archive/roll9/", *common]) == 2
    assert "s3://archive/roll9/: no such file or folder" in capsys.readouterr().err
    assert main(["colorize", "s3://archive/roll1/a.png.bak", *common]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
