"""``python -m service batch submit|status|wait|cancel|download`` against a real ``serve`` process
(tiny random weights, as tests/test_batches_process.py): the client's answers are checked against
the server's own routes and the files it wrote."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from batch_support import jsonl, manifest_bytes, serve, tiny_png, write_images

from service.cli import main

pytestmark = pytest.mark.slow

ALICE, BOB = "key-alice-0001-0123456789", "key-bob-0002-0123456789"
KEYS = f"alice:{ALICE},bob:{BOB}"
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, url: str, key: str | None = None) -> list[str]:
    return ["batch", "--url", url, *(["--api-key", key] if key else []), *args]


def test_submit_wait_and_download_a_manifest(
    tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real entry point, configured by COLORIZE_URL and COLORIZE_API_KEY: submit --wait
    --download ends with the batch's final object, a progress bar, exit 3 for the failed item,
    and a zip equal to the images the server wrote; keys are honoured."""
    images = write_images(tmp_path / "inputs" / "scans", 6)
    (tmp_path / "inputs" / "scans" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [{"custom_id": f"id-{i}", "source": str(p)} for i, p in enumerate(images)]
    lines.append({"custom_id": "corrupt", "source": "scans/corrupt.png"})
    manifest = tmp_path / "batch.jsonl"
    manifest.write_bytes(manifest_bytes(lines))
    results = tmp_path / "results" / "scans.zip"
    with serve(tiny_checkpoints, tmp_path, COLORIZE_API_KEYS=KEYS) as server:
        env = {**os.environ, "COLORIZE_URL": server.base, "COLORIZE_API_KEY": ALICE,
               "PYTHONPATH": str(REPO)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "service", "batch", "submit", "--manifest", str(manifest),
             "--options", '{"format": "png"}', "--metadata", '{"project": "scans"}',
             "--interval", "0.2", "--wait", "--download", str(results)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert done.returncode == 3, done.stderr  # completed, with one failed item
        ended = json.loads(done.stdout[: done.stdout.rindex("}") + 1])
        assert ended["status"] == "completed" and ended["metadata"] == {"project": "scans"}
        assert ended["request_counts"] == {"total": 7, "completed": 6, "failed": 1}
        assert "7/7" in done.stderr  # the progress bar reached the end
        assert "1 failed item" in done.stderr
        assert f"{results}  " in done.stdout
        assert [p.name for p in results.parent.iterdir()] == ["scans.zip"]  # no .part left

        alice = server.client(ALICE)
        batch_id = ended["id"]
        archive = zipfile.ZipFile(results)
        output = jsonl(alice, f"/batches/{batch_id}/output")
        zipped = [json.loads(x) for x in archive.read("output.jsonl").decode().splitlines()]
        assert sorted(zipped, key=lambda o: o["custom_id"]) == sorted(
            output, key=lambda o: o["custom_id"]
        )
        folder = tmp_path / "out" / batch_id
        for line in output:
            written = (folder / line["response"]["path"]).read_bytes()
            assert archive.read(f"images/{line['custom_id']}.png") == written
        errors = archive.read("errors.jsonl").decode().splitlines()
        assert [json.loads(e)["custom_id"] for e in errors] == ["corrupt"]

        # status as alice is the server's own object; bob and no key are refused
        capsys.readouterr()
        assert main(cli("status", batch_id, url=server.base, key=ALICE)) == 0
        assert json.loads(capsys.readouterr().out) == alice.get(f"/batches/{batch_id}").json()
        assert main(cli("status", batch_id, url=server.base, key=BOB)) == 1
        assert ": 404: no batch" in capsys.readouterr().err
        assert main(cli("status", batch_id, url=server.base)) == 1
        assert ": 401: " in capsys.readouterr().err

        # a failed download leaves the file that was there untouched
        results.write_bytes(b"old")
        assert main(cli("download", "batch_nope", "-o", str(results), url=server.base,
                        key=ALICE)) == 1  # fmt: skip
        assert results.read_bytes() == b"old"
        assert [p.name for p in results.parent.iterdir()] == ["scans.zip"]


def test_archive_submit_wait_cancel_and_download(
    tiny_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An archive submitted in-process (``main``); ``wait --max-wait`` gives up while it runs;
    ``cancel`` stops it; ``wait`` then exits 1 (cancelled) and ``download`` has the partial
    results, as many as the server counted completed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as members:
        for i in range(300):
            members.writestr(f"roll/{i:04d}.png", tiny_png(i))
    archive = tmp_path / "roll.zip"
    archive.write_bytes(buffer.getvalue())
    with serve(tiny_checkpoints, tmp_path) as server:
        url = server.base
        assert main(cli("submit", str(archive), "--idempotency-key", "roll-1", url=url)) == 0
        batch = json.loads(capsys.readouterr().out)
        assert batch["request_counts"]["total"] == 300
        assert main(cli("submit", str(archive), "--idempotency-key", "roll-1", url=url)) == 0
        assert json.loads(capsys.readouterr().out)["id"] == batch["id"]  # the same batch

        client = server.client()
        while client.get(f"/batches/{batch['id']}").json()["request_counts"]["completed"] < 3:
            time.sleep(0.05)
        assert main(cli("wait", batch["id"], "--max-wait", "0.3", "--interval", "0.1",
                        "--no-progress", url=url)) == 1  # fmt: skip
        assert "still in_progress after 0.3 s" in capsys.readouterr().err

        assert main(cli("cancel", batch["id"], url=url)) == 0
        assert json.loads(capsys.readouterr().out)["status"] in ("cancelling", "cancelled")
        assert main(cli("wait", batch["id"], "--interval", "0.1", url=url)) == 1
        captured = capsys.readouterr()
        ended = json.loads(captured.out)
        assert ended["status"] == "cancelled" and "ended cancelled" in captured.err
        completed = ended["request_counts"]["completed"]
        assert 3 <= completed < 300

        target = tmp_path / "partial.zip"
        assert main(cli("download", batch["id"], "-o", str(target), "--no-progress",
                        url=url)) == 0  # fmt: skip
        names = zipfile.ZipFile(target).namelist()
        assert len([n for n in names if n.startswith("images/roll/")]) == completed
        assert len(zipfile.ZipFile(target).read("output.jsonl").splitlines()) == completed


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["submit", "missing.zip"], 2, "missing.zip: no such file"),
        (["submit", "--manifest", "{here}", "--options", "{bad"], 2, "--options: not JSON"),
        (["submit", "--manifest", "{here}", "--metadata", "[1]"], 2, "expected a JSON object"),
        (["submit", "--manifest", "{here}", "--download", "x.zip"], 2, "--download needs --wait"),
        (["status", "batch_x"], 1, "is the service at that URL?"),
    ],
)
def test_usage_and_connection_errors(
    args: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batch_support import free_port

    here = tmp_path / "m.jsonl"
    here.write_text("{}\n")
    args = [a.replace("{here}", str(here)) for a in args]
    assert main(cli(*args, url=f"http://127.0.0.1:{free_port()}")) == code
    assert message in capsys.readouterr().err
