"""The web page's batch section in a real browser (Debian's Chromium through Playwright) against a
real ``serve`` process with API keys: a zip of 3 tiny images goes through POST /batches, the page
follows the batch to completed, and the archive it downloads holds the 3 results. Also a refused
upload (its problem detail shown), cancel, and the key's list of batches.

The server and browser fixtures are those of tests/test_web_page.py.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_web_page as web
from batch_support import tiny_png
from PIL import Image

pytestmark = pytest.mark.slow

browser = web.browser  # the fixture, under its own name (pytest finds fixtures by attribute)
Browser, Server = web.Browser, web.Server


@pytest.fixture(scope="module")
def batch_server(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """API keys on, no detector, batch state and results in a temporary folder; one batch item
    in flight so a larger batch is still running when the page cancels it."""
    root = tmp_path_factory.mktemp("web-batches")
    with web.serve(tiny_checkpoints, root / "serve.log", "--no-detector",
                   COLORIZE_API_KEYS=f"web:{web.API_KEY}", COLORIZE_STATE_DIR=str(root / "state"),
                   COLORIZE_BATCH_OUTPUT_DIR=str(root / "out"),
                   COLORIZE_BATCH_IN_FLIGHT="1") as running:  # fmt: skip
        yield running


def zip_of(folder: Path, name: str, count: int, size: int) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"photo-{i}.png", tiny_png(i, size))
    return path


def wait_batch(page: web.Page, status: str) -> None:
    page.wait_for_function(
        "s => document.querySelector('#batch-current')?.dataset.status === s", arg=status
    )


def test_batch_upload_progress_download_cancel_and_list(
    batch_server: Server, browser: Browser, tmp_path: Path
) -> None:
    p = browser.page
    three = zip_of(tmp_path, "three.zip", 3, 48)
    p.goto(batch_server.base + "/")
    p.wait_for_function(
        "() => document.querySelector('#batch-list-empty').textContent.includes('API key')"
    )
    assert p.locator("#key-form").is_hidden()  # the list on page load never pops the key form

    # Without a key the submit gets 401: the key form opens; with the key the batch starts.
    p.set_input_files("#batch-file", str(three))
    p.click("#batch-submit")
    p.wait_for_selector("#key-form:not([hidden])")
    assert p.evaluate("document.activeElement.id") == "api-key"
    p.fill("#api-key", web.API_KEY)
    p.click("#key-form button[type=submit]")
    with p.expect_response(
        lambda r: r.url.endswith("/batches") and r.request.method == "POST"
    ) as sent:
        p.click("#batch-submit")
    assert sent.value.status == 202
    batch_id = sent.value.json()["id"]
    wait_batch(p, "completed")
    assert p.locator("#batch-current").get_attribute("data-id") == batch_id
    assert p.locator("#batch-id").inner_text() == batch_id
    assert p.locator("#batch-status").inner_text() == "completed · 3 of 3 done"
    bar = p.evaluate("() => [document.querySelector('#batch-progress').value, "
                     "document.querySelector('#batch-progress').max]")  # fmt: skip
    assert bar == [3, 3]
    assert p.locator("#batch-cancel").is_hidden()
    polls = [u for u, _ in browser.requests if u.endswith(f"/batches/{batch_id}")]
    assert polls  # the page followed the batch through GET /batches/{id}

    # The download: the archive fetched with the key, 3 images and their 3 output lines.
    with p.expect_download() as download_info:
        p.click("#batch-download")
    download = download_info.value
    assert download.suggested_filename == f"{batch_id}.zip"
    saved = tmp_path / "results.zip"
    download.save_as(saved)
    with zipfile.ZipFile(saved) as results:
        names = sorted(results.namelist())
        assert names == sorted(["output.jsonl", "errors.jsonl"]
                               + [f"images/photo-{i}.png" for i in range(3)])  # fmt: skip
        lines = [json.loads(line) for line in results.read("output.jsonl").splitlines()]
        assert sorted(line["custom_id"] for line in lines) == [f"photo-{i}.png" for i in range(3)]
        assert results.read("errors.jsonl") == b""
        for i in range(3):
            with Image.open(io.BytesIO(results.read(f"images/photo-{i}.png"))) as image:
                assert image.size == (48, 48) and image.mode == "RGB"

    # The list of the key's batches shows it, completed.
    p.wait_for_selector(f'#batch-list li[data-id="{batch_id}"][data-status="completed"]')

    # A refused upload: the problem+json detail, as the page shows other errors.
    not_an_archive = tmp_path / "notes.zip"
    not_an_archive.write_bytes(b"these are not the images you are looking for")
    p.set_input_files("#batch-file", str(not_an_archive))
    p.click("#batch-submit")
    p.wait_for_selector("#batch-error:not([hidden])")
    error = p.locator("#batch-error").inner_text()
    assert "(422)" in error and "archive refused" in error, error

    # Cancel a larger batch while it runs: it ends cancelled with fewer than all items done.
    many = zip_of(tmp_path, "many.zip", 150, 8)
    p.set_input_files("#batch-file", str(many))
    p.click("#batch-submit")
    p.wait_for_selector("#batch-cancel:visible")
    second = str(p.locator("#batch-current").get_attribute("data-id"))
    assert second != batch_id
    p.click("#batch-cancel")
    wait_batch(p, "cancelled")
    assert p.locator("#batch-error").is_hidden()
    done, total = p.evaluate("() => [document.querySelector('#batch-progress').value, "
                             "document.querySelector('#batch-progress').max]")  # fmt: skip
    assert total == 150 and done < 150
    p.wait_for_selector(f'#batch-list li[data-id="{second}"][data-status="cancelled"]')

    # Picking the first batch in the list shows it again.
    p.click(f'button[aria-label="Show batch {batch_id}"]')
    p.wait_for_function(
        "id => document.querySelector('#batch-current').dataset.id === id", arg=batch_id
    )
    wait_batch(p, "completed")

    batch_calls = [h for u, h in browser.requests if "/batches" in u]
    assert batch_calls[-1].get("x-api-key") == web.API_KEY
    web.only_to(batch_server, browser)
