"""Download the weight files, verify them and prove they load (``python -m service fetch-weights``).

Four sources, each described by data (``RemoteFile``):

* the authors' checkpoint zip on Google Drive (``models.checkpoints.OFFICIAL_ZIP_DRIVE_ID``); only
  ``coco_finetuned_mask_256_ffs/latest_net_{G,GF,GComp}.pth`` are extracted, to
  ``DIR/checkpoints/coco_finetuned_mask_256_ffs/``. No checksum is published: the files are
  verified by loading them strictly, and their sha256 is printed for the record;
* OpenMMLab's single-file conversion (``models.checkpoints.MMAGIC_URL``) to ``DIR/<its name>``. Its
  name ends in ``-<8 hex>.pth``, the first 8 hex digits of the file's sha256 (OpenMMLab's
  ``tools/publish_model.py`` names files ``<name>-<sha256sum[:8]>.pth``); that prefix is checked;
* torchvision's COCO Mask R-CNN (``models.detector.DETECTOR_WEIGHTS``) to ``DIR/<its name>``, whose
  name carries the sha256 prefix that torchvision itself checks; that prefix is checked;
* on request, torchvision's ImageNet VGG16 (``VGG16_Weights.IMAGENET1K_V1``), the LPIPS backbone
  of ``evaluate``, to ``DIR/vgg16-397923af.pth``; its sha256 prefix is checked the same way.

Every download streams into a temporary file beside its destination and is renamed into place only
after the byte count and checksum are right, so no half-written or unverified file is ever left.
Files already present and verified are not downloaded again. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import html
import http.client
import logging
import os
import re
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO, Literal
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
from urllib.request import HTTPCookieProcessor, Request, build_opener

from models.checkpoints import (
    MMAGIC_URL,
    NETWORK_FILES,
    OFFICIAL_VARIANT,
    OFFICIAL_ZIP_DRIVE_ID,
    sha256_file,
)
from models.detector import DETECTOR_WEIGHTS

log = logging.getLogger(__name__)

Variant = Literal["official", "mmagic"]
DetectorChoice = Literal["v1", "v2", "none"]

DRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"
OFFICIAL_ZIP_NAME = "checkpoints.zip"  # the name the authors' download script gives the zip
BASE_URL_ENV = "COLORIZE_WEIGHTS_BASE_URL"
USER_AGENT = "instcolor-service fetch-weights"
CHUNK = 1 << 20
MAX_CONFIRM_PAGES = 4
MAX_PAGE_BYTES = 1 << 20


class DownloadError(RuntimeError):
    """A download failed or produced an unusable file; nothing was left at the destination."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the checksum the file name promises."""


@dataclass(frozen=True)
class RemoteFile:
    """Where a file comes from, the name it is stored under and its sha256 prefix when known."""

    url: str
    filename: str
    sha256_prefix: str | None = None

    def matches(self, digest: str) -> bool:
        return self.sha256_prefix is None or digest.startswith(self.sha256_prefix.lower())


def _name_hash(filename: str) -> str | None:
    """``name-<hex>.pth`` -> ``<hex>``: the sha256-prefix naming of torchvision and OpenMMLab."""
    found = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", filename)
    return found.group(1) if found else None


def remote_file(url: str) -> RemoteFile:
    """A file named by its URL; a ``-<hex>`` suffix in the name is its sha256 prefix."""
    filename = url.rsplit("/", 1)[-1]
    return RemoteFile(url, filename, _name_hash(filename))


@dataclass(frozen=True)
class WeightSources:
    """Where each weight file is downloaded from (replace it for mirrors and tests)."""

    official_zip: RemoteFile
    mmagic: RemoteFile
    detectors: Mapping[str, RemoteFile] = field(default_factory=dict)
    lpips_vgg16: RemoteFile | None = None

    @classmethod
    def default(cls) -> WeightSources:
        from torchvision.models import VGG16_Weights

        return cls(
            official_zip=RemoteFile(DRIVE_URL.format(id=OFFICIAL_ZIP_DRIVE_ID), OFFICIAL_ZIP_NAME),
            mmagic=remote_file(MMAGIC_URL),
            detectors={
                v: RemoteFile(w.url, w.filename, w.sha256_prefix)
                for v, w in DETECTOR_WEIGHTS.items()
            },
            lpips_vgg16=remote_file(VGG16_Weights.IMAGENET1K_V1.url),
        )

    @classmethod
    def mirror(cls, base_url: str) -> WeightSources:
        """Every file under ``base_url`` by its usual name (the zip as ``checkpoints.zip``)."""
        base = base_url.rstrip("/") + "/"

        def moved(remote: RemoteFile) -> RemoteFile:
            return replace(remote, url=base + remote.filename)

        default = cls.default()
        return cls(
            official_zip=RemoteFile(base + OFFICIAL_ZIP_NAME, OFFICIAL_ZIP_NAME),
            mmagic=moved(default.mmagic),
            detectors={v: moved(f) for v, f in default.detectors.items()},
            lpips_vgg16=moved(default.lpips_vgg16) if default.lpips_vgg16 else None,
        )

    @classmethod
    def from_environment(cls, base_url: str | None = None) -> WeightSources:
        """``base_url`` (``--base-url``), else ``COLORIZE_WEIGHTS_BASE_URL``, else the originals."""
        chosen = base_url or os.environ.get(BASE_URL_ENV)
        return cls.mirror(chosen) if chosen else cls.default()


@dataclass(frozen=True)
class FetchedFile:
    path: Path
    sha256: str
    downloaded: bool  # False: it was already there and verified


@dataclass
class FetchReport:
    files: list[FetchedFile] = field(default_factory=list)
    checkpoints: Path | None = None  # what COLORIZE_CHECKPOINTS should point at
    detector_weights: Path | None = None  # what COLORIZE_DETECTOR_WEIGHTS should point at
    lpips_vgg16: Path | None = None  # what evaluate --lpips-weights should point at


# -- HTTP ---------------------------------------------------------------------------------------


class _PageParser(HTMLParser):
    """Forms (action and inputs) and links of an HTML page, enough for Drive's confirm page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_form = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((values.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and values.get("name"):
            self.forms[-1][1][values["name"]] = values.get("value", "")
        elif tag == "a" and "href" in values:
            self.links.append(values["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def _with_query(url: str, extra: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(extra)
    return urlunsplit(parts._replace(query=urlencode(query)))


def drive_confirm_url(page: str, url: str, cookies: CookieJar) -> str | None:
    """The URL that confirms a Google Drive "can't scan this file for viruses" page, if any.

    Three generations of the page are understood: a form (``download-form``, today pointing to
    drive.usercontent.google.com) whose hidden inputs carry ``confirm``/``uuid``; a link with
    ``confirm=<token>``; a ``download_warning*`` cookie whose value is the token.
    """
    parser = _PageParser()
    parser.feed(page)
    for action, inputs in parser.forms:
        if "confirm" in inputs or "id" in inputs:
            return _with_query(urljoin(url, html.unescape(action) or url), inputs)
    for href in parser.links:
        if "confirm=" in href:
            return urljoin(url, html.unescape(href))
    for cookie in cookies:
        if cookie.name.startswith("download_warning") and cookie.value:
            return _with_query(url, {"confirm": cookie.value})
    return None


def _check_scheme(url: str) -> None:
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http and https URLs are supported")


@contextmanager
def open_url(url: str, timeout: float) -> Iterator[http.client.HTTPResponse]:
    """GET ``url`` and yield the response of the file itself, passing Drive's confirm pages."""
    cookies = CookieJar()
    opener = build_opener(HTTPCookieProcessor(cookies))
    current = url
    for _ in range(MAX_CONFIRM_PAGES):
        _check_scheme(current)
        request = Request(current, headers={"User-Agent": USER_AGENT})  # noqa: S310 (checked)
        try:
            response = opener.open(request, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadError(f"{current}: {exc}") from exc
        if response.headers.get_content_type() != "text/html":
            with response:
                yield response
            return
        with response:
            page = response.read(MAX_PAGE_BYTES).decode("utf-8", "replace")
        following = drive_confirm_url(page, current, cookies)
        if following is None:
            parser = _PageParser()
            parser.feed(page)
            title = parser.title.strip() or "no title"
            raise DownloadError(
                f"{current}: got an HTML page ({title!r}) instead of the file. Google Drive "
                "refuses downloads when a file's quota is exceeded: try later, or download it in "
                "a browser and serve it from a mirror (--base-url)"
            )
        log.info("following the download confirmation page of %s", current)
        current = following
    raise DownloadError(f"{url}: more than {MAX_CONFIRM_PAGES} confirmation pages")


def _copy(
    response: http.client.HTTPResponse,
    out: IO[bytes],
    digest: hashlib._Hash,
    label: str,
    progress: bool,
) -> int:
    from tqdm import tqdm

    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    received = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=not progress
    ) as bar:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"{label}: connection lost after {received} bytes ({exc})"
                ) from exc
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if total is not None and received != total:
        raise DownloadError(f"{label}: truncated download, got {received} of {total} bytes")
    return received


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")


def download(
    remote: RemoteFile, destination: Path, *, timeout: float = 60.0, progress: bool = True
) -> str:
    """Stream ``remote`` to ``destination`` atomically; return the sha256. Checks the prefix."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_beside(destination)
    try:
        digest = hashlib.sha256()
        with open_url(remote.url, timeout) as response, temp.open("xb") as out:
            size = _copy(response, out, digest, remote.filename, progress)
        sha256 = digest.hexdigest()
        if not remote.matches(sha256):
            raise ChecksumError(
                f"{remote.url}: checksum mismatch: sha256 {sha256} does not start with "
                f"{remote.sha256_prefix} (from the file name); the download is corrupt or not "
                "the published file, and was discarded"
            )
        os.replace(temp, destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s (%d bytes) to %s", remote.url, size, destination)
    return sha256


# -- the three kinds of weights -----------------------------------------------------------------


def _verified_present(path: Path, remote: RemoteFile) -> str | None:
    """The sha256 of ``path`` if it exists and matches ``remote``'s checksum, else None."""
    if not path.is_file():
        return None
    if remote.sha256_prefix is None:  # nothing to check it against: hashing it would be wasted
        log.warning("%s exists but has no known checksum: downloading it again", path)
        return None
    digest = sha256_file(path)
    if remote.matches(digest):
        return digest
    log.warning(
        "%s exists but does not match the checksum %s: downloading it again",
        path,
        remote.sha256_prefix,
    )
    return None


def _prove(paths: list[Path], check: Callable[[], object], what: str) -> None:
    """Run ``check()``; if the files do not load, remove them and raise ``DownloadError``."""
    from models.checkpoints import CheckpointError

    try:
        check()
    except CheckpointError as exc:
        for path in paths:
            path.unlink(missing_ok=True)
        raise DownloadError(f"{what} downloaded but does not load, removed it: {exc}") from exc


def fetch_single(
    remote: RemoteFile,
    folder: Path,
    *,
    timeout: float,
    progress: bool,
    verify: Callable[[Path], object] | None,
) -> FetchedFile:
    """A single checksummed file (MMagic, detector) into ``folder``, skipped if already right."""
    path = folder / remote.filename
    present = _verified_present(path, remote)
    if present is not None:
        return FetchedFile(path, present, downloaded=False)
    sha256 = download(remote, path, timeout=timeout, progress=progress)
    if verify is not None:
        _prove([path], lambda: verify(path), str(path))
    return FetchedFile(path, sha256, downloaded=True)


def official_dir(folder: Path) -> Path:
    return folder / "checkpoints" / OFFICIAL_VARIANT


def _present_official(target: Path) -> list[FetchedFile] | None:
    """The three files in ``target`` if they are all there and load (hashed by the loader)."""
    from models.checkpoints import CheckpointError, load_networks

    if not all((target / spec.filename).is_file() for spec in NETWORK_FILES):
        return None
    try:
        networks = load_networks(target)
    except CheckpointError as exc:
        log.warning("%s: present but not loadable (%s): downloading again", target, exc)
        return None
    return [FetchedFile(f.path, f.sha256, downloaded=False) for f in networks.files]


def _zip_member(archive: zipfile.ZipFile, filename: str) -> zipfile.ZipInfo:
    suffix = f"{OFFICIAL_VARIANT}/{filename}"
    for info in archive.infolist():
        if info.filename.replace("\\", "/").endswith(suffix) and not info.is_dir():
            return info
    names = ", ".join(i.filename for i in archive.infolist()[:8])
    raise DownloadError(f"the checkpoint zip has no */{suffix} (it holds {names} ...)")


def fetch_official(
    remote: RemoteFile, folder: Path, *, timeout: float, progress: bool, verify: bool = True
) -> list[FetchedFile]:
    """The authors' zip -> ``folder/checkpoints/coco_finetuned_mask_256_ffs/latest_net_*.pth``."""
    from models.checkpoints import load_networks

    target = official_dir(folder)
    present = _present_official(target)
    if present is not None:
        return present
    archive_path = _temp_beside(folder / remote.filename)
    written: list[FetchedFile] = []
    try:
        zip_sha256 = download(remote, archive_path, timeout=timeout, progress=progress)
        log.info("checkpoint zip sha256 %s", zip_sha256)
        target.mkdir(parents=True, exist_ok=True)
        try:
            archive = zipfile.ZipFile(archive_path)
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{remote.url}: not a zip file ({exc})") from exc
        with archive:
            for spec in NETWORK_FILES:
                member = _zip_member(archive, spec.filename)
                path = target / spec.filename
                temp = _temp_beside(path)
                digest = hashlib.sha256()
                try:
                    with archive.open(member) as source, temp.open("xb") as out:
                        while block := source.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                    os.replace(temp, path)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise DownloadError(
                        f"{remote.url}: cannot extract {member.filename} ({exc})"
                    ) from exc
                finally:
                    temp.unlink(missing_ok=True)
                written.append(FetchedFile(path, digest.hexdigest(), downloaded=True))
    except BaseException:
        for item in written:
            item.path.unlink(missing_ok=True)
        raise
    finally:
        archive_path.unlink(missing_ok=True)
    if verify:
        _prove([f.path for f in written], lambda: load_networks(target), str(target))
    return written


def fetch_weights(
    folder: Path,
    variant: Variant = "official",
    detector: DetectorChoice = "v1",
    *,
    sources: WeightSources | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    verify: bool = True,
    lpips_vgg16: bool = False,
) -> FetchReport:
    """Download what ``variant`` and ``detector`` need into ``folder``; verify and load each.

    ``lpips_vgg16``: also torchvision's VGG16, the LPIPS backbone of ``evaluate``.
    """
    from models.checkpoints import load_networks
    from models.detector import BoxDetector

    sources = sources or WeightSources.default()
    report = FetchReport()
    if variant == "official":
        report.files += fetch_official(
            sources.official_zip, folder, timeout=timeout, progress=progress, verify=verify
        )
        report.checkpoints = folder / "checkpoints"
    else:
        item = fetch_single(
            sources.mmagic,
            folder,
            timeout=timeout,
            progress=progress,
            verify=load_networks if verify else None,
        )
        report.files.append(item)
        report.checkpoints = item.path
    if detector != "none":
        if detector not in sources.detectors:
            raise DownloadError(f"no download source for detector {detector!r}")
        version = detector
        item = fetch_single(
            sources.detectors[detector],
            folder,
            timeout=timeout,
            progress=progress,
            verify=(lambda path: BoxDetector.from_file(path, version)) if verify else None,
        )
        report.files.append(item)
        report.detector_weights = item.path
    if lpips_vgg16:
        from evaluation.metrics import LpipsMetric

        if sources.lpips_vgg16 is None:
            raise DownloadError("no download source for the LPIPS VGG16 weights")
        item = fetch_single(
            sources.lpips_vgg16,
            folder,
            timeout=timeout,
            progress=progress,
            verify=LpipsMetric.from_vgg16_file if verify else None,
        )
        report.files.append(item)
        report.lpips_vgg16 = item.path
    return report
