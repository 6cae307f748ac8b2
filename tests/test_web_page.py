"""The web page in a real browser: Debian's headless Chromium driven by Playwright, against a real
``serve`` process with random-weight checkpoints and a random-weight Mask R-CNN.

Upload, before/after, boxes, remove and draw a box, colour strength, download, an error from the
problem detail, and the API-key prompt. Every request the page makes must go to the server. A
screenshot is saved under ``artifacts/`` (``INSTCOLOR_ARTIFACTS`` overrides) for CI to keep.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from deploy_support import missing_tool
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from playwright.sync_api import Page, sync_playwright
from test_serve_process import free_port, wait_ready

from service.router.web import install_web_page

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("INSTCOLOR_ARTIFACTS", REPO / "artifacts"))
TIMEOUT_MS = 60_000
API_KEY = "web-page-test-key-0123456789"
STAGES = ("decode", "queue", "detect", "instance", "fusion", "merge", "encode", "total")


def scene(width: int = 320, height: int = 240) -> Image.Image:
    """A grayscale picture with a few object-like shapes (sky gradient, sun, houses, a tree)."""
    rows = np.linspace(215, 120, height)[:, None].repeat(width, axis=1)
    image = Image.fromarray(rows.astype(np.uint8), mode="L")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(height * 0.72), width, height), fill=90)
    draw.ellipse((int(width * 0.72), 18, int(width * 0.72) + 44, 62), fill=245)
    draw.rectangle((30, 110, 120, 185), fill=60)
    draw.polygon([(22, 112), (75, 70), (128, 112)], fill=35)
    draw.rectangle((62, 145, 88, 185), fill=150)
    draw.rectangle((165, 125, 235, 190), fill=175)
    draw.ellipse((250, 95, 305, 160), fill=70)
    draw.rectangle((273, 155, 283, 195), fill=45)
    return image


@dataclass
class Server:
    base: str
    process: subprocess.Popen[str]
    log: Path


@dataclass
class Browser:
    page: Page
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # url, headers
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, CSP violations


@contextmanager
def serve(checkpoints: Path, log: Path, *args: str, **env: str) -> Iterator[Server]:
    """A real ``serve`` process on a free port (CPU, no warm-up), stopped afterwards."""
    port = free_port()
    environment = {**os.environ, "COLORIZE_MAX_BATCH_SIZE": "2",
                   "COLORIZE_MAX_BATCH_DELAY_MS": "10", "COLORIZE_WARMUP": "false", **env}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--checkpoints", str(checkpoints), *args,
         "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=environment, cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, log)
        yield Server(base, process, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(
    tiny_checkpoints: Path, detector_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """With the random-weight detector at a small size, so it proposes boxes quickly."""
    log = tmp_path_factory.mktemp("web") / "serve.log"
    with serve(tiny_checkpoints, log, "--detector-weights", str(detector_weights),
               COLORIZE_DETECTOR_MIN_SIZE="240", COLORIZE_DETECTOR_MAX_SIZE="320") as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def keyed_server(
    tiny_checkpoints: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """API keys enabled (COLORIZE_API_KEYS), no detector."""
    log = tmp_path_factory.mktemp("web-keys") / "serve.log"
    with serve(
        tiny_checkpoints, log, "--no-detector", COLORIZE_API_KEYS=f"web:{API_KEY}"
    ) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        missing_tool("chromium")  # a skip here, a failure in CI
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1360, "height": 1000},
                                           accept_downloads=True)  # fmt: skip
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            recorded = Browser(page)
            page.on("request", lambda r: recorded.requests.append((r.url, r.headers)))
            page.on("pageerror", lambda error: recorded.errors.append(str(error)))
            page.on("console", lambda m: recorded.errors.append(m.text)
                    if "Content Security Policy" in m.text else None)  # fmt: skip
            yield recorded
            assert recorded.errors == []
        finally:
            chromium.close()


def only_to(server: Server, browser: Browser) -> None:
    """Every request the page made went to ``server`` (blob: and data: URLs are the page's own)."""
    urls = [url for url, _ in browser.requests if not url.startswith(("blob:", "data:"))]
    assert {urlsplit(url).netloc for url in urls} == {urlsplit(server.base).netloc}, urls


def item_status(page: Page, index: int) -> str:
    return str(page.locator(".queue-item").nth(index).get_attribute("data-status"))


def wait_done(page: Page, index: int) -> None:
    """Wait until image ``index`` has a fresh result (status done).

    Predicates are functions, never expression strings: Playwright evals those, which the page's
    Content-Security-Policy (no 'unsafe-eval') forbids."""
    page.wait_for_function(
        "i => document.querySelectorAll('.queue-item')[i]?.dataset.status === 'done'", arg=index
    )


def fact(page: Page, name: str) -> str:
    return str(page.locator(f'#result-facts dd[data-fact="{name}"]').inner_text())


def test_page_end_to_end(server: Server, browser: Browser, tmp_path: Path) -> None:
    p = browser.page
    photo = tmp_path / "street.jpg"
    scene().save(photo, quality=92)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

    response = httpx.get(server.base + "/")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
    p.goto(server.base + "/")
    p.wait_for_function("() => document.querySelector('#model-info').textContent.includes('Model')")
    assert "maskrcnn_resnet50_fpn_v1" in p.locator("#model-info").inner_text()

    # Every control can be reached from the keyboard and has a label.
    unlabelled = p.evaluate("""() => [...document.querySelectorAll('input, select, button')]
        .filter(el => el.type !== 'hidden' && !(el.labels && el.labels.length)
                && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.id || el.outerHTML)""")
    assert unlabelled == []
    p.keyboard.press("Tab")
    p.keyboard.press("Tab")
    assert p.evaluate("document.activeElement.id") == "file-input"

    # Options: every box the random detector proposes, at most three of them.
    p.fill("#opt-score-threshold", "0")
    p.fill("#opt-max-instances", "3")
    p.set_input_files("#file-input", [str(photo), str(broken)])
    wait_done(p, 0)
    p.wait_for_function(
        "() => document.querySelectorAll('.queue-item')[1]?.dataset.status === 'failed'"
    )

    # The error of the broken file comes from the problem detail.
    error = p.locator(".queue-item").nth(1).locator(".item-error").inner_text()
    assert "400" in error and "could not be decoded" in error
    with p.expect_response(lambda r: "/colorize?" in r.url) as retried:
        p.click('button[aria-label="Retry broken.png"]')
    assert retried.value.status == 400
    p.wait_for_function(
        "() => document.querySelectorAll('.queue-item')[1].dataset.status === 'failed'"
    )

    # Before and after at the output's resolution, boxes drawn with their scores.
    p.wait_for_function("() => document.querySelector('#after-img').naturalWidth > 0")
    sizes = p.evaluate("""() => ['#before-img', '#after-img'].map(s => {
        const img = document.querySelector(s); return [img.naturalWidth, img.naturalHeight,
        img.getBoundingClientRect().width]; })""")
    assert sizes[0][:2] == [320, 240] and sizes[1][:2] == [320, 240]
    assert sizes[0][2] == sizes[1][2] > 0
    assert fact(p, "Instances") == "3"
    assert p.locator("#overlay g.box").count() == 3
    labels = p.locator("#overlay g.box text").all_text_contents()
    assert all(label.split(": ")[1].replace(".", "").isdigit() for label in labels), labels
    stages = p.locator("#timings tbody tr").evaluate_all("rows => rows.map(r => r.dataset.stage)")
    assert set(STAGES) <= set(stages)
    assert fact(p, "Model version")

    # Side by side and slider modes; zoom doubles the displayed size (boxes are drawn at 200%).
    p.check('input[name="mode"][value="side"]')
    lefts = p.evaluate("""() => ['#before-img', '#after-img'].map(
        s => document.querySelector(s).getBoundingClientRect().left)""")
    assert lefts[1] >= lefts[0] + 320
    p.check('input[name="mode"][value="slider"]')
    p.click("#zoom-actual")
    p.fill("#zoom", "200")
    width = p.evaluate("document.querySelector('#after-img').getBoundingClientRect().width")
    assert width == 640

    # Remove a box (from the keyboard) and colorize again with exactly the other two.
    p.focus('#box-list button[aria-label="Remove box 1"]')
    p.keyboard.press("Enter")
    assert p.locator("#box-list .box-item").count() == 2
    kept = p.locator("#box-list .box-item span").all_inner_texts()
    p.click("#recolorize")
    p.wait_for_function("() => document.querySelector('.queue-item').dataset.status !== 'done'")
    wait_done(p, 0)
    assert fact(p, "Instances") == "2"
    assert p.locator("#box-list .box-item span").all_inner_texts() == kept

    # Draw a new box with the mouse; it is sent and comes back marked as drawn.
    p.click("#draw-toggle")
    box = p.locator("#overlay").bounding_box()
    p.mouse.move(box["x"] + 40, box["y"] + 30)
    p.mouse.down()
    p.mouse.move(box["x"] + 200, box["y"] + 150, steps=5)
    p.mouse.up()
    assert p.locator("#box-list .box-item").count() == 3
    assert "[20, 15, 100, 75]" in p.locator("#box-list .box-item").nth(2).inner_text()
    p.click("#recolorize")
    p.wait_for_function("() => document.querySelector('.queue-item').dataset.status !== 'done'")
    wait_done(p, 0)
    assert fact(p, "Instances") == "3"
    assert p.locator("#overlay g.drawn").count() == 1
    assert "score drawn" in p.locator("#box-list").inner_text()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.click("#zoom-fit")
    shot = ARTIFACTS / "web-page.png"
    p.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    # "Show boxes" off hides them (and draws no stray preview rectangle); on shows them again.
    p.uncheck("#show-boxes")
    assert "hidden-boxes" in str(p.locator("#overlay").get_attribute("class"))
    assert p.locator("#overlay rect.preview").count() == 0
    p.check("#show-boxes")
    assert "hidden-boxes" not in str(p.locator("#overlay").get_attribute("class"))

    # Colour strength 0 from the keyboard (Home on the range), colorize again, download.
    p.focus("#opt-saturation")
    p.keyboard.press("Home")
    assert p.locator("#saturation-value").inner_text() == "0.00"
    p.click("#recolorize")
    p.wait_for_function("() => document.querySelector('.queue-item').dataset.status !== 'done'")
    wait_done(p, 0)
    assert fact(p, "Colour strength") == "0.00"
    with p.expect_download() as download_info:
        p.click("#download")
    download = download_info.value
    assert download.suggested_filename == "street-colorized.jpg"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with Image.open(saved) as result:
        result.load()
        assert result.format == "JPEG" and result.size == (320, 240)
        rgb = np.asarray(result.convert("RGB"), dtype=np.int16)
    assert int((rgb.max(axis=2) - rgb.min(axis=2)).max()) <= 6  # no colour left (JPEG noise)

    # Network resolution: a 256x256 output; boxes (input pixels) are drawn scaled onto it.
    p.select_option("#opt-resolution", "network")
    p.click("#use-detector")
    p.wait_for_function("() => document.querySelector('.queue-item').dataset.status !== 'done'")
    wait_done(p, 0)
    p.wait_for_function("() => document.querySelector('#after-img').naturalWidth === 256")
    assert fact(p, "Output").startswith("256×256") and fact(p, "Input") == "320×240"
    first = p.locator("#box-list .box-item span").first.inner_text()
    x1, y1 = (int(v) for v in first.split("[")[1].split(",")[:2])
    rect = p.locator("#overlay g.box rect").first
    assert float(rect.get_attribute("x") or 0) == pytest.approx(x1 * 256 / 320)
    assert float(rect.get_attribute("y") or 0) == pytest.approx(y1 * 256 / 240)

    loaded = {urlsplit(url).path for url, _ in browser.requests}
    assert {f"/static/{name}" for name in MODULES} <= loaded  # every ES module came from /static/
    only_to(server, browser)


def test_page_with_api_keys(keyed_server: Server, browser: Browser, tmp_path: Path) -> None:
    """Keys enabled: the page still loads; a 401 shows the key form; a wrong key is refused; the
    right one is kept in sessionStorage, sent as X-API-Key, and the refused image goes through."""
    p = browser.page
    photo = tmp_path / "p.png"
    scene(96, 72).save(photo)
    refused = httpx.post(keyed_server.base + "/colorize", content=photo.read_bytes(),
                         headers={"content-type": "image/png"})  # fmt: skip
    assert refused.status_code == 401 and "bearer" in refused.headers["www-authenticate"].lower()
    assert httpx.get(keyed_server.base + "/").status_code == 200  # the page itself is open
    assert httpx.get(keyed_server.base + "/static/app.js").status_code == 200
    p.goto(keyed_server.base + "/")
    p.wait_for_function(
        "() => document.querySelector('#model-info').textContent.includes('API key')"
    )
    p.set_input_files("#file-input", str(photo))
    p.wait_for_selector("#key-form:not([hidden])")
    assert item_status(p, 0) == "needs-key"
    assert "API key" in p.locator(".queue-item .item-error").inner_text()
    assert p.evaluate("document.activeElement.id") == "api-key"
    p.keyboard.type("wrong")
    p.keyboard.press("Enter")
    p.wait_for_function(
        "() => document.querySelector('#key-message').textContent.includes('refused')"
    )
    p.wait_for_selector("#key-form:not([hidden])")
    p.fill("#api-key", API_KEY)
    p.click("#key-form button[type=submit]")
    wait_done(p, 0)
    assert fact(p, "Instances") == "0"
    assert p.evaluate("sessionStorage.getItem('instcolor.apiKey')") == API_KEY
    assert p.locator("#key-status").is_visible()
    p.wait_for_function("() => document.querySelector('#model-info').textContent.includes('Model')")
    sent = [headers.get("x-api-key") for url, headers in browser.requests if "/colorize?" in url]
    assert sent == [None, "wrong", API_KEY]

    p.click("#forget-key")  # forgotten: the next request asks again
    assert p.evaluate("sessionStorage.getItem('instcolor.apiKey')") is None
    p.click("#use-detector")
    p.wait_for_selector("#key-form:not([hidden])")
    only_to(keyed_server, browser)


STATIC = REPO / "service" / "router" / "static"
MODULES = ("app.js", "api.js", "apikey.js", "batches.js", "boxes.js", "compare.js", "dom.js",
           "facts.js", "frame.js", "hints.js", "info.js", "list.js", "models.js", "options.js",
           "queue.js", "samples.js", "state.js", "upload.js", "viewer.js")  # fmt: skip
IMPORT = re.compile(r'^import [^;]+ from "\./([a-z]+\.js)";$', re.MULTILINE)


@pytest.fixture(scope="module")
def zoo_server(zoo_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two models (serve --models instcolor,zhang-eccv16 --weights-dir DIR), no detector."""
    log = tmp_path_factory.mktemp("web-zoo") / "serve.log"
    with serve(zoo_weights / "checkpoints", log, "--no-detector", "--weights-dir",
               str(zoo_weights), "--models", "instcolor,zhang-eccv16") as running:  # fmt: skip
        yield running


def test_page_model_picker_and_models_side_by_side(
    zoo_server: Server, browser: Browser, tmp_path: Path
) -> None:
    """The picker lists GET /models; the chosen model colorizes; "Compare these models" shows
    the same photo under each checked model, side by side, each captioned with its model."""
    p = browser.page
    photo = tmp_path / "street.png"
    scene().save(photo)
    p.goto(zoo_server.base + "/")
    p.wait_for_function("() => document.querySelectorAll('#opt-model option').length === 2")
    values = p.locator("#opt-model option").evaluate_all("os => os.map(o => o.value)")
    assert values == ["instcolor", "zhang-eccv16"]
    assert p.locator("#opt-model").input_value() == "instcolor"  # the server's default

    p.select_option("#opt-model", "zhang-eccv16")
    with p.expect_response(lambda r: "/colorize?" in r.url) as answered:
        p.set_input_files("#file-input", [str(photo)])
    assert "model=zhang-eccv16" in answered.value.url
    wait_done(p, 0)
    assert fact(p, "Model") == "zhang-eccv16"
    assert fact(p, "Model version").startswith("zhang-eccv16-")

    checks = p.locator('input[name="compare-model"]')
    assert checks.evaluate_all("cs => cs.map(c => c.value)") == ["instcolor", "zhang-eccv16"]
    p.click("#compare-models")
    p.wait_for_function(
        "() => [...document.querySelectorAll('#model-grid figure img')]"
        ".filter(i => i.naturalWidth > 0).length === 2"
    )
    figures = p.locator("#model-grid figure")
    assert figures.evaluate_all("fs => fs.map(f => f.dataset.model)") == [
        "instcolor", "zhang-eccv16",
    ]  # fmt: skip
    captions = p.locator("#model-grid figcaption").all_inner_texts()
    assert captions[0].startswith("instcolor · instcolor-")
    assert captions[1].startswith("zhang-eccv16 · zhang-eccv16-")
    sizes = p.evaluate("""() => [...document.querySelectorAll('#model-grid img')].map(
        i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().left])""")
    assert [s[:2] for s in sizes] == [[320, 240], [320, 240]]
    assert sizes[1][2] > sizes[0][2]  # next to each other
    sent = [url for url, _ in browser.requests if "/colorize?" in url]
    assert any("model=instcolor" in url for url in sent)
    assert sum("model=zhang-eccv16" in url for url in sent) == 2
    only_to(zoo_server, browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "web-page-models.png"), full_page=True)


def test_page_temperature_field_for_the_annealed_mean_models(
    zoo_server: Server, browser: Browser, tmp_path: Path
) -> None:
    """The "Temperature" field shows only while a model that decodes by the annealed mean is
    chosen (GET /models ``temperature``); filled in, the request carries ?temperature=T."""
    p = browser.page
    photo = tmp_path / "street.png"
    scene().save(photo)
    p.goto(zoo_server.base + "/")
    p.wait_for_function("() => document.querySelectorAll('#opt-model option').length === 2")
    assert p.locator("#temperature-field").is_hidden()  # instcolor: no annealed mean
    p.select_option("#opt-model", "zhang-eccv16")
    assert p.locator("#temperature-field").is_visible()
    assert p.locator("#opt-temperature").get_attribute("placeholder") == "model default 1"
    p.fill("#opt-temperature", "0.38")
    with p.expect_response(lambda r: "/colorize?" in r.url) as answered:
        p.set_input_files("#file-input", [str(photo)])
    assert "temperature=0.38" in answered.value.url and answered.value.status == 200
    wait_done(p, 0)
    p.select_option("#opt-model", "instcolor")
    assert p.locator("#temperature-field").is_hidden()
    only_to(zoo_server, browser)


@pytest.fixture(scope="module")
def larsson_server(
    larsson_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """serve --models instcolor,larsson-eccv16, Larsson at the processing size 64 (input 32)."""
    log = tmp_path_factory.mktemp("web-larsson") / "serve.log"
    with serve(larsson_weights / "checkpoints", log, "--no-detector", "--weights-dir",
               str(larsson_weights), "--models", "instcolor,larsson-eccv16",
               COLORIZE_LARSSON_SIZE="64") as running:  # fmt: skip
        yield running


def test_page_lists_and_runs_larsson(
    larsson_server: Server, browser: Browser, tmp_path: Path
) -> None:
    """Larsson ECCV16 is in the picker and the side-by-side choices, and colorizes when chosen."""
    p = browser.page
    photo = tmp_path / "street.png"
    scene(160, 120).save(photo)
    p.goto(larsson_server.base + "/")
    p.wait_for_function("() => document.querySelectorAll('#opt-model option').length === 2")
    values = p.locator("#opt-model option").evaluate_all("os => os.map(o => o.value)")
    assert values == ["instcolor", "larsson-eccv16"]
    checks = p.locator('input[name="compare-model"]')
    assert checks.evaluate_all("cs => cs.map(c => c.value)") == ["instcolor", "larsson-eccv16"]
    p.select_option("#opt-model", "larsson-eccv16")
    with p.expect_response(lambda r: "/colorize?" in r.url) as answered:
        p.set_input_files("#file-input", [str(photo)])
    assert "model=larsson-eccv16" in answered.value.url
    assert answered.value.status == 200
    wait_done(p, 0)
    assert fact(p, "Model") == "larsson-eccv16"
    assert fact(p, "Model version").startswith("larsson-eccv16-")
    only_to(larsson_server, browser)


@pytest.fixture(scope="module")
def hints_server(zoo_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The user-guided model (serve --models zhang-siggraph17,zhang-eccv16), no detector."""
    log = tmp_path_factory.mktemp("web-hints") / "serve.log"
    with serve(zoo_weights / "checkpoints", log, "--no-detector", "--weights-dir",
               str(zoo_weights), "--models", "zhang-siggraph17,zhang-eccv16") as running:  # fmt: skip
        yield running


def hint_rows(page: Page) -> list[str]:
    return page.locator("#hint-list .hint-item .link").all_inner_texts()


def test_page_colour_hints(hints_server: Server, browser: Browser, tmp_path: Path) -> None:
    """Click to drop a point, recolour it from the palette, drag it, sample a colour from the
    result, remove a point; the marks are drawn over the view; the next request carries exactly
    the points shown."""
    import io
    import json
    from urllib.parse import parse_qs

    p = browser.page
    photo = tmp_path / "street.png"
    scene().save(photo)
    p.goto(hints_server.base + "/")
    p.wait_for_function("() => document.querySelectorAll('#opt-model option').length === 2")
    labels = p.locator("#opt-model option").all_inner_texts()
    assert labels == ["zhang-siggraph17 (follows hints)", "zhang-eccv16"]
    with p.expect_request(lambda r: "/colorize?" in r.url) as asked:
        p.set_input_files("#file-input", [str(photo)])
    wait_done(p, 0)
    assert "hints=" not in asked.value.url  # nothing placed yet: nothing sent
    # the same request outside the browser gives the result the page shows (seeded weights)
    url = hints_server.base + "/colorize?" + urlsplit(asked.value.url).query
    answer = httpx.post(url, content=photo.read_bytes(), headers={"content-type": "image/png"},
                        timeout=120)  # fmt: skip
    result = Image.open(io.BytesIO(answer.content)).convert("RGB")

    layer = p.locator("#hint-overlay")
    box = layer.bounding_box()
    assert box is not None

    def at(x: int, y: int) -> dict[str, float]:  # input pixel (x, y) -> a point on the layer
        return {"x": (x + 0.5) * box["width"] / 320, "y": (y + 0.5) * box["height"] / 240}

    p.click("#hint-place")
    layer.click(position=at(60, 40))
    assert hint_rows(p) == ["Hint 1 · (60, 40) · #3a7bd5 · size 3"]
    p.click('#hint-palette [data-color="#b86a48"]')  # recolours the selected (new) point
    assert "#b86a48" in hint_rows(p)[0]
    # drag it to (200, 120) (the palette click may have scrolled: the layer's place is re-read)
    layer.scroll_into_view_if_needed()
    now = layer.bounding_box()
    assert now is not None
    start, end = at(60, 40), at(200, 120)
    p.mouse.move(now["x"] + start["x"], now["y"] + start["y"])
    p.mouse.down()
    p.mouse.move(now["x"] + end["x"], now["y"] + end["y"], steps=5)
    p.mouse.up()
    assert hint_rows(p) == ["Hint 1 · (200, 120) · #b86a48 · size 3"]
    # a second point with a colour sampled from the result, then it is removed again
    p.select_option("#hint-size", "5")
    p.click("#hint-sample")
    layer.click(position=at(300, 20))
    sampled = "#{:02x}{:02x}{:02x}".format(*result.getpixel((300, 20)))
    assert p.locator("#hint-color").input_value() == sampled
    # the colour and the size go to the selected point (and to the next one)
    assert hint_rows(p) == [f"Hint 1 · (200, 120) · {sampled} · size 5"]
    p.click("#hint-place")
    layer.click(position=at(10, 200))
    assert len(hint_rows(p)) == 2 and f"{sampled} · size 5" in hint_rows(p)[1]
    assert p.locator("#hint-overlay circle.hint-mark").count() == 2
    p.click('button[aria-label="Remove hint 2"]')
    assert p.locator("#hint-overlay circle.hint-mark").count() == 1
    p.locator("#hint-list .hint-item .link").first.click()  # select point 1, give it the brick
    p.click('#hint-palette [data-color="#b86a48"]')
    fill = p.locator("#hint-overlay circle.hint-mark").get_attribute("fill")
    assert fill == "#b86a48"

    with p.expect_response(lambda r: "/colorize?" in r.url) as again:
        p.click("#recolorize-hints")
    sent = json.loads(parse_qs(urlsplit(again.value.url).query)["hints"][0])
    assert sent == [{"x": 200, "y": 120, "color": "#b86a48", "size": 5}]
    assert again.value.status == 200
    wait_done(p, 0)
    assert hint_rows(p) == ["Hint 1 · (200, 120) · #b86a48 · size 5"]  # kept after the answer
    # side by side: the point is drawn over the before view too
    p.check('input[name="mode"][value="side"]')
    marks = p.locator(".before-pane .hint-overlay circle.hint-mark")
    assert marks.count() == 1 and marks.first.is_visible()
    # a model without hints refuses them with its message on the page
    p.select_option("#opt-model", "zhang-eccv16")
    with p.expect_response(lambda r: "/colorize?" in r.url) as refused:
        p.click("#recolorize-hints")
    assert refused.value.status == 422
    p.wait_for_function("() => document.querySelector('.queue-item')?.dataset.status === 'failed'")
    only_to(hints_server, browser)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "web-page-hints.png"), full_page=True)


@pytest.fixture(scope="module")
def zhao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """serve --models instcolor,zhao-pixelated: a narrow seeded Zhao model (as
    tests/test_zhao_serving.py writes it) in the training's file layout, no detector."""
    import torch
    from weight_files import write_official

    from models.zhao_pixelated import FILENAME, ZhaoPixelated, save_zhao_pixelated

    root = tmp_path_factory.mktemp("web-zhao")
    write_official(root / "checkpoints", width=8, seed=0)
    torch.manual_seed(4)
    tiny = ZhaoPixelated(classes=5, generator_layers=2, generator_channels=16, divisor=16)
    save_zhao_pixelated(tiny, root / "zhao-pixelated" / FILENAME)
    with serve(root / "checkpoints", root / "serve.log", "--no-detector", "--weights-dir",
               str(root), "--models", "instcolor,zhao-pixelated") as running:  # fmt: skip
        yield running


def test_page_samples_side_by_side(zhao_server: Server, browser: Browser, tmp_path: Path) -> None:
    """A sampling model offers Samples and Seed; the request asks for samples=N with Accept:
    application/json; the N colourings are shown side by side; the picked one is the result shown
    and downloaded (byte for byte the server's sample, drawn again outside the browser)."""
    import base64
    from urllib.parse import parse_qs

    p = browser.page
    photo = tmp_path / "street.png"
    scene(64, 48).save(photo)
    p.goto(zhao_server.base + "/")
    p.wait_for_function("() => document.querySelectorAll('#opt-model option').length === 2")
    labels = p.locator("#opt-model option").all_inner_texts()
    assert labels == ["instcolor (uses boxes)", "zhao-pixelated (up to 8 samples)"]
    assert not p.locator("#sampling-fields").is_visible()  # instcolor does not sample
    p.select_option("#opt-model", "zhao-pixelated")
    assert p.locator("#sampling-fields").is_visible()
    assert p.locator("#opt-samples").get_attribute("max") == "8"
    p.fill("#opt-samples", "3")
    p.fill("#opt-seed", "7")
    with p.expect_response(lambda r: "/colorize?" in r.url) as answered:
        p.set_input_files("#file-input", [str(photo)])
    response = answered.value
    query = parse_qs(urlsplit(response.url).query)
    assert query["model"] == ["zhao-pixelated"] and query["samples"] == ["3"]
    assert query["seed"] == ["7"]
    assert response.request.headers["accept"] == "application/json"
    assert response.status == 200
    wait_done(p, 0)
    assert fact(p, "Model") == "zhao-pixelated" and fact(p, "Seed") == "7"
    assert fact(p, "Sample") == "1 of 3"

    # the same request outside the browser: the seed makes it the same three samples
    again = httpx.post(response.url, content=photo.read_bytes(), timeout=300,
                       headers={"content-type": "image/png", "accept": "application/json"})  # fmt: skip
    samples = [s["image_base64"] for s in again.json()["samples"]]
    assert len(set(samples)) == 3

    p.wait_for_function(
        "() => [...document.querySelectorAll('#sample-grid img')]"
        ".filter(i => i.naturalWidth > 0).length === 3"
    )
    geometry = p.evaluate("""() => [...document.querySelectorAll('#sample-grid button')].map(
        b => [b.dataset.index, b.getAttribute('aria-pressed'), b.getBoundingClientRect().left,
              b.getBoundingClientRect().top, b.querySelector('img').naturalWidth])""")
    assert [g[0] for g in geometry] == ["0", "1", "2"]
    assert [g[1] for g in geometry] == ["true", "false", "false"]  # sample 0 until one is picked
    assert geometry[0][2] < geometry[1][2] < geometry[2][2]  # side by side, in one row
    assert geometry[0][3] == geometry[1][3] == geometry[2][3]
    assert all(g[4] == 64 for g in geometry)

    p.click('#sample-grid button[aria-label="Pick sample 3"]')
    assert fact(p, "Sample") == "3 of 3"
    pressed = p.locator("#sample-grid button").evaluate_all(
        "bs => bs.map(b => b.getAttribute('aria-pressed'))"
    )
    assert pressed == ["false", "false", "true"]
    with p.expect_download() as download_info:
        p.click("#download")
    download = download_info.value
    assert download.suggested_filename == "street-colorized-s2.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes() == base64.b64decode(samples[2])
    # the viewer shows what was downloaded: the picked sample
    shown = p.evaluate("() => [document.querySelector('#after-img').src, "
                       "document.querySelector('#download').href]")  # fmt: skip
    assert shown[0] == shown[1] and shown[0].startswith("blob:")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "web-page-samples.png"), full_page=True)

    # a seed the server refuses: its 422 detail on the image's row
    p.fill("#opt-seed", "-1")
    with p.expect_response(lambda r: "/colorize?" in r.url) as refused:
        p.click("#use-detector")
    assert refused.value.status == 422
    p.wait_for_function("() => document.querySelector('.queue-item')?.dataset.status === 'failed'")
    assert "seed" in p.locator(".queue-item .item-error").inner_text()
    p.fill("#opt-seed", "")

    # back to a model that does not sample: no samples asked for, no grid
    p.select_option("#opt-model", "instcolor")
    assert not p.locator("#sampling-fields").is_visible()
    with p.expect_response(lambda r: "/colorize?" in r.url) as plain:
        p.click("#use-detector")
    assert "samples=" not in plain.value.url and "seed=" not in plain.value.url
    assert plain.value.status == 200
    wait_done(p, 0)
    assert fact(p, "Model") == "instcolor"
    assert not p.locator("#samples-panel").is_visible()
    only_to(zhao_server, browser)


def test_static_files_are_packaged() -> None:
    """index.html, app.css and the page's ES modules ship inside the package; nothing comes from
    another host."""
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "app.css", *MODULES}
    assert {p.name for p in STATIC.glob("*.js")} == set(MODULES)
    html = (STATIC / "index.html").read_text()
    assert '<script type="module" src="/static/app.js"></script>' in html
    assert "/static/app.css" in html
    for asset in ("index.html", "app.css", *MODULES):  # nothing from another host
        text = (STATIC / asset).read_text().replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "http://" not in text and "//cdn" not in text, asset


def test_modules_import_each_other_without_a_cycle() -> None:
    """Every module the page imports exists next to it, and app.js reaches all of them without
    an import cycle (each module is one concern; app.js only wires them)."""
    imports = {name: IMPORT.findall((STATIC / name).read_text()) for name in MODULES}
    for name, targets in imports.items():
        assert set(targets) <= set(MODULES), (name, targets)
        assert "import(" not in (STATIC / name).read_text(), name  # static imports only

    reached: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        reached.add(name)
        for target in imports[name]:
            visit(target, (*path, name))

    visit("app.js", ())
    assert reached == set(MODULES)


def test_modules_are_served_as_javascript() -> None:
    """Browsers run a module script only with a JavaScript MIME type (an HTML spec rule)."""
    app = FastAPI()
    install_web_page(app)
    with TestClient(app) as client:
        for name in MODULES:
            response = client.get(f"/static/{name}")
            assert response.status_code == 200, name
            mime = response.headers["content-type"].split(";")[0].strip()
            assert mime in {"text/javascript", "application/javascript"}, (name, mime)
            assert response.text == (STATIC / name).read_text()
        assert client.get("/static/app.css").headers["content-type"].startswith("text/css")


def test_static_files_in_the_built_wheel(tmp_path: Path) -> None:
    """setuptools package-data carries the page into the wheel (what the Docker image installs)."""
    source = tmp_path / "src"  # a copy: building never writes build/ or egg-info into the repo
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("models", "service"):
        shutil.copytree(REPO / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(tmp_path / "dist"), str(source)]  # fmt: skip
    result = subprocess.run(pip, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("instcolor_service-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"index.html", "app.css", *MODULES}
    assert {f"service/router/static/{name}" for name in expected} <= names
