"""What ``colorize --engine ray`` reads, planned on the driver without Ray: URI arguments kept as
URIs, a ``file://`` URI listed through pyarrow's filesystem and read back (the S3 path is the same
code with pyarrow's S3 filesystem, not reachable offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import build_parser
from service.commands.colorize_ray import read_source
from service.commands.colorize_sources import SourceError, plan_manifest, plan_uri

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
