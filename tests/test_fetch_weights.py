"""fetch-weights against a local HTTP server on 127.0.0.1 serving files from tests/weight_files.py.

Covers the Google Drive confirm-page flows (form and cookie), checksum verification, truncated
downloads, pages instead of files, and the guarantee that a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.cookiejar import Cookie, CookieJar
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from weight_files import write_mmagic, write_official, write_vgg16

from models.checkpoints import MMAGIC_FILENAME, NETWORK_FILES, OFFICIAL_VARIANT, load_networks
from service.cli import main
from service.settings import ModelSettings
from service.weights.fetch import fetch_weights
from service.weights.http import drive_confirm_url
from service.weights.sources import (
    ChecksumError,
    DownloadError,
    RemoteFile,
    WeightSources,
    remote_file,
)

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.server.requests.append(self.path)
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        route(self)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def send_bytes(data: bytes, content_type: str = "application/octet-stream") -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    return route


def send_file(path: Path) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(path.stat().st_size))
        handler.end_headers()
        with path.open("rb") as source:
            while block := source.read(1 << 20):
                handler.wfile.write(block)

    return route


def send_truncated(data: bytes) -> Route:
    """Announce the full length, send half, close the connection: a dropped download."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.wfile.flush()
        handler.close_connection = True

    return route


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def official_zip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zip laid out like the authors' checkpoints.zip (other variants beside the one we need)."""
    root = tmp_path_factory.mktemp("zip")
    write_official(root / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=3)
    (root / "checkpoints" / "siggraph_retrained").mkdir()
    (root / "checkpoints" / "siggraph_retrained" / "latest_net_G.pth").write_bytes(b"other")
    archive = root / "checkpoints.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted((root / "checkpoints").rglob("*")):
            zf.write(file, file.relative_to(root).as_posix())
    return archive.read_bytes()


@pytest.fixture(scope="module")
def mmagic_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_mmagic(tmp_path_factory.mktemp("mm") / "m.pth", width=8, seed=5).read_bytes()


def sources(
    server: _Server, zip_path: str = "/uc?export=download&id=ABC", **kw: RemoteFile
) -> WeightSources:
    return WeightSources(
        official_zip=RemoteFile(server.url + zip_path, "checkpoints.zip"),
        mmagic=kw.get("mmagic", RemoteFile(server.url + "/missing.pth", "missing.pth")),
        detectors={"v1": kw["detector"]} if "detector" in kw else {},
        lpips_vgg16=kw.get("lpips_vgg16"),
    )


def leftovers(folder: Path) -> list[str]:
    """Every file below ``folder`` (temporary .part files included)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def drive_form_routes(server: _Server, payload: bytes) -> None:
    """Today's Drive: an HTML "can't scan for viruses" page with a form to drive.usercontent."""
    page = f"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
    <body><form id="download-form" action="{server.url}/download" method="get">
    <input type="submit" value="Download anyway"/>
    <input type="hidden" name="id" value="ABC"><input type="hidden" name="export" value="download">
    <input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1">
    </form></body></html>""".encode()

    def download(handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        if (
            query.get("confirm") != ["t"]
            or query.get("uuid") != ["u-1"]
            or query.get("id") != ["ABC"]
        ):
            handler.send_error(403)
            return
        send_bytes(payload)(handler)

    server.routes["/uc"] = send_bytes(page, "text/html; charset=utf-8")
    server.routes["/download"] = download


def test_official_zip_through_drive_confirm_form(
    server: _Server, official_zip: bytes, tmp_path: Path
) -> None:
    drive_form_routes(server, official_zip)
    report = fetch_weights(tmp_path, "official", "none", sources=sources(server), progress=False)

    target = tmp_path / "checkpoints" / OFFICIAL_VARIANT
    assert leftovers(tmp_path) == sorted(
        f"checkpoints/{OFFICIAL_VARIANT}/{spec.filename}" for spec in NETWORK_FILES
    )  # only the three needed files: not the zip, not the other variant, no .part files
    with zipfile.ZipFile(__import__("io").BytesIO(official_zip)) as zf:
        for spec in NETWORK_FILES:
            member = zf.read(f"checkpoints/{OFFICIAL_VARIANT}/{spec.filename}")
            assert (target / spec.filename).read_bytes() == member
    assert {f.path: f.sha256 for f in report.files} == {
        target / s.filename: sha256((target / s.filename).read_bytes()) for s in NETWORK_FILES
    }
    assert all(f.downloaded for f in report.files)
    assert [r.split("?")[0] for r in server.requests] == ["/uc", "/download"]
    # the layout the settings' default understands
    settings = ModelSettings(checkpoints=tmp_path / "checkpoints", detector=False)
    assert settings.missing_weight_files() == []
    assert load_networks(report.checkpoints or tmp_path).layout == "official"


def test_drive_cookie_token_flow(server: _Server, official_zip: bytes, tmp_path: Path) -> None:
    """Older Drive: a download_warning cookie holds the token to pass as confirm=."""

    def uc(handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        if query.get("confirm") == ["TOKEN42"]:
            send_bytes(official_zip)(handler)
            return
        body = b"<html><head><title>Warning</title></head><body>too large to scan</body></html>"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Set-Cookie", "download_warning_13058_ABC=TOKEN42; Path=/")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server.routes["/uc"] = uc
    report = fetch_weights(tmp_path, "official", "none", sources=sources(server), progress=False)
    assert len(report.files) == 3
    assert len(server.requests) == 2
    assert "confirm=TOKEN42" in server.requests[1]


def test_drive_page_without_token_is_an_error(server: _Server, tmp_path: Path) -> None:
    page = (
        b"<html><head><title>Google Drive - Quota exceeded</title></head><body>Sorry</body></html>"
    )
    server.routes["/uc"] = send_bytes(page, "text/html")
    with pytest.raises(DownloadError, match="Quota exceeded"):
        fetch_weights(tmp_path, "official", "none", sources=sources(server), progress=False)
    assert leftovers(tmp_path) == []


def test_confirm_url_variants() -> None:
    base = "https://drive.google.com/uc?export=download&id=X"
    form = (
        '<form id="download-form" action="https://drive.usercontent.google.com/download">'
        '<input type="hidden" name="id" value="X"><input type="hidden" name="confirm" value="t">'
        "</form>"
    )
    assert drive_confirm_url(form, base, CookieJar()) == (
        "https://drive.usercontent.google.com/download?id=X&confirm=t"
    )
    link = (
        '<a id="uc-download-link" href="/uc?export=download&amp;confirm=Ab1_&amp;id=X">Download</a>'
    )
    assert drive_confirm_url(link, base, CookieJar()) == (
        "https://drive.google.com/uc?export=download&confirm=Ab1_&id=X"
    )
    jar = CookieJar()
    jar.set_cookie(
        Cookie(
            0,
            "download_warning_1_X",
            "tok",
            None,
            False,
            ".drive.google.com",
            True,
            True,
            "/",
            True,
            False,
            None,
            False,
            None,
            None,
            {},
        )
    )
    assert drive_confirm_url("<p>no form</p>", base, jar) == f"{base}&confirm=tok"
    assert drive_confirm_url("<p>quota exceeded</p>", base, CookieJar()) is None


def test_mmagic_checksum_verified_and_loaded(
    server: _Server, mmagic_bytes: bytes, tmp_path: Path
) -> None:
    name = f"inst-colorization-{sha256(mmagic_bytes)[:8]}.pth"
    server.routes[f"/{name}"] = send_bytes(mmagic_bytes)
    remote = remote_file(f"{server.url}/{name}")
    assert remote.sha256_prefix == sha256(mmagic_bytes)[:8]

    report = fetch_weights(
        tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
    )
    assert report.checkpoints == tmp_path / name
    assert leftovers(tmp_path) == [name]
    assert report.files[0].sha256 == sha256(mmagic_bytes)
    assert load_networks(tmp_path / name).layout == "mmagic"

    # present and verified: not downloaded again
    again = fetch_weights(
        tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
    )
    assert not again.files[0].downloaded
    assert len(server.requests) == 1


def test_checksum_mismatch_is_refused_and_leaves_nothing(
    server: _Server, mmagic_bytes: bytes, tmp_path: Path
) -> None:
    server.routes["/m-deadbeef.pth"] = send_bytes(mmagic_bytes)
    remote = remote_file(f"{server.url}/m-deadbeef.pth")
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch_weights(
            tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
        )
    assert leftovers(tmp_path) == []


def test_stale_file_with_wrong_checksum_is_replaced(
    server: _Server, mmagic_bytes: bytes, tmp_path: Path
) -> None:
    name = f"m-{sha256(mmagic_bytes)[:8]}.pth"
    server.routes[f"/{name}"] = send_bytes(mmagic_bytes)
    (tmp_path / name).write_bytes(b"an interrupted copy from some other tool")
    remote = remote_file(f"{server.url}/{name}")
    report = fetch_weights(
        tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
    )
    assert report.files[0].downloaded
    assert (tmp_path / name).read_bytes() == mmagic_bytes


def test_truncated_download_leaves_nothing(
    server: _Server, mmagic_bytes: bytes, tmp_path: Path
) -> None:
    name = f"m-{sha256(mmagic_bytes)[:8]}.pth"
    server.routes[f"/{name}"] = send_truncated(mmagic_bytes)
    remote = remote_file(f"{server.url}/{name}")
    with pytest.raises(DownloadError, match=r"truncated|connection lost"):
        fetch_weights(
            tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
        )
    assert leftovers(tmp_path) == []


def test_file_that_does_not_load_is_removed(server: _Server, tmp_path: Path) -> None:
    """Right checksum, wrong content (not a checkpoint): the load check refuses and removes it."""
    junk = b"not a pytorch file" * 100
    name = f"m-{sha256(junk)[:8]}.pth"
    server.routes[f"/{name}"] = send_bytes(junk)
    remote = remote_file(f"{server.url}/{name}")
    with pytest.raises(DownloadError, match="does not load"):
        fetch_weights(
            tmp_path, "mmagic", "none", sources=sources(server, mmagic=remote), progress=False
        )
    assert leftovers(tmp_path) == []


def test_zip_without_the_needed_files(server: _Server, tmp_path: Path) -> None:
    buffer = tmp_path.parent / f"{tmp_path.name}-other.zip"
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("checkpoints/siggraph_retrained/latest_net_G.pth", b"x")
    server.routes["/uc"] = send_bytes(buffer.read_bytes())
    with pytest.raises(DownloadError, match=f"no \\*/{OFFICIAL_VARIANT}/latest_net_G.pth"):
        fetch_weights(tmp_path, "official", "none", sources=sources(server), progress=False)
    assert leftovers(tmp_path) == []


def test_http_error_is_reported(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        fetch_weights(
            tmp_path, "official", "none", sources=sources(server, "/nothing"), progress=False
        )
    assert leftovers(tmp_path) == []


def test_detector_checksum_and_load(
    server: _Server, detector_weights: Path, tmp_path: Path
) -> None:
    """The detector file's name carries the sha256 prefix of its contents, as torchvision's does."""
    digest = hashlib.sha256(detector_weights.read_bytes()).hexdigest()
    name = f"maskrcnn_resnet50_fpn_coco-{digest[:8]}.pth"
    server.routes[f"/{name}"] = send_file(detector_weights)
    detector = remote_file(f"{server.url}/{name}")
    dest = tmp_path / "weights"
    # official checkpoints are already there (so only the detector is fetched)
    write_official(dest / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=1)
    report = fetch_weights(
        dest, "official", "v1", sources=sources(server, detector=detector), progress=False
    )
    assert report.detector_weights == dest / name
    assert [f.downloaded for f in report.files] == [False, False, False, True]
    assert report.files[-1].sha256 == digest
    assert (dest / name).stat().st_size == detector_weights.stat().st_size
    assert server.requests == [f"/{name}"]


def test_cli_with_mirror_prints_sha256_and_skips_present_files(
    server: _Server, official_zip: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.routes["/mirror/checkpoints.zip"] = send_bytes(official_zip)
    args = [
        "fetch-weights",
        "--dir",
        str(tmp_path),
        "--detector",
        "none",
        "--no-progress",
        "--base-url",
        f"{server.url}/mirror/",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for spec in NETWORK_FILES:
        path = tmp_path / "checkpoints" / OFFICIAL_VARIANT / spec.filename
        assert f"downloaded {path}  sha256 {sha256(path.read_bytes())}" in out
    assert "COLORIZE_DETECTOR=false" in out

    assert main(args) == 0
    assert capsys.readouterr().out.count("present") == 3
    assert len(server.requests) == 1


def test_cli_checksum_mismatch_exit_code(
    server: _Server,
    mmagic_bytes: bytes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mirror serving other bytes under the published MMagic name: refused, exit 1."""
    server.routes[f"/{MMAGIC_FILENAME}"] = send_bytes(mmagic_bytes)
    monkeypatch.setenv("COLORIZE_WEIGHTS_BASE_URL", server.url)
    code = main(
        [
            "fetch-weights",
            "--dir",
            str(tmp_path),
            "--variant",
            "mmagic",
            "--detector",
            "none",
            "--no-progress",
        ]
    )
    assert code == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_default_sources_use_the_published_names() -> None:
    default = WeightSources.default()
    assert default.mmagic.filename == MMAGIC_FILENAME
    assert default.mmagic.sha256_prefix == "5b9d4eee"
    assert default.detectors["v1"].filename == "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    assert default.detectors["v1"].sha256_prefix == "bf2d0c1e"
    assert "drive.google.com" in default.official_zip.url


@pytest.fixture(scope="module")
def vgg16_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_vgg16(tmp_path_factory.mktemp("vgg") / "vgg16.pth", seed=2).read_bytes()


def test_lpips_vgg16_checksum_verified_and_loaded(
    server: _Server, vgg16_bytes: bytes, tmp_path: Path
) -> None:
    from evaluation.metrics import LpipsMetric

    name = f"vgg16-{sha256(vgg16_bytes)[:8]}.pth"
    server.routes[f"/{name}"] = send_bytes(vgg16_bytes)
    dest = tmp_path / "weights"
    write_official(dest / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=1)
    remote = sources(server, lpips_vgg16=remote_file(f"{server.url}/{name}"))
    report = fetch_weights(dest, "official", "none", sources=remote, progress=False,
                           lpips_vgg16=True)  # fmt: skip
    assert report.lpips_vgg16 == dest / name
    assert report.files[-1].downloaded
    assert report.files[-1].sha256 == sha256(vgg16_bytes)
    LpipsMetric.from_vgg16_file(dest / name)  # loads into the LPIPS backbone
    again = fetch_weights(dest, "official", "none", sources=remote, progress=False,
                          lpips_vgg16=True)  # fmt: skip
    assert not again.files[-1].downloaded
    assert server.requests == [f"/{name}"]
    # without the option the VGG16 file is not asked for
    assert (
        fetch_weights(dest, "official", "none", sources=remote, progress=False).lpips_vgg16 is None
    )


def test_lpips_vgg16_that_does_not_load_is_removed(server: _Server, tmp_path: Path) -> None:
    junk = b"not a vgg16 state dict" * 50
    name = f"vgg16-{sha256(junk)[:8]}.pth"
    server.routes[f"/{name}"] = send_bytes(junk)
    dest = tmp_path / "weights"
    write_official(dest / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=1)
    remote = sources(server, lpips_vgg16=remote_file(f"{server.url}/{name}"))
    with pytest.raises(DownloadError, match="does not load"):
        fetch_weights(dest, "official", "none", sources=remote, progress=False, lpips_vgg16=True)
    assert not (dest / name).exists()


def test_cli_lpips_vgg16_from_a_mirror_is_checksummed(
    server: _Server, vgg16_bytes: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mirror serves other bytes under torchvision's name vgg16-397923af.pth: refused, exit 1."""
    server.routes["/vgg16-397923af.pth"] = send_bytes(vgg16_bytes)
    write_official(tmp_path / "checkpoints" / OFFICIAL_VARIANT, width=8, seed=1)
    code = main(["fetch-weights", "--dir", str(tmp_path), "--detector", "none", "--lpips-vgg16",
                 "--no-progress", "--base-url", server.url])  # fmt: skip
    assert code == 1
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "vgg16-397923af.pth").exists()
    assert server.requests == ["/vgg16-397923af.pth"]


def test_default_lpips_source_is_torchvisions_vgg16() -> None:
    from evaluation.metrics import VGG16_FILENAME
    from service.commands.evaluate import LPIPS_VGG16_FILENAME

    vgg16 = WeightSources.default().lpips_vgg16
    assert vgg16 is not None
    assert vgg16.url == "https://download.pytorch.org/models/vgg16-397923af.pth"
    assert vgg16.sha256_prefix == "397923af"
    assert VGG16_FILENAME == LPIPS_VGG16_FILENAME == vgg16.filename
