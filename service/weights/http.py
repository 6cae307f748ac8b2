"""Streaming downloads over HTTP(S) with the standard library: Google Drive's confirm page,
redirects, a byte count and a checksum, and an atomic rename into place."""

from __future__ import annotations

import hashlib
import html
import http.client
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from html.parser import HTMLParser
from http.cookiejar import CookieJar
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
from urllib.request import HTTPCookieProcessor, Request, build_opener

from models.atomic import atomic_path
from service.weights.sources import (
    CHUNK,
    MAX_CONFIRM_PAGES,
    MAX_PAGE_BYTES,
    USER_AGENT,
    ChecksumError,
    DownloadError,
    RemoteFile,
    UnreachableError,
)

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
"""Temporary downloads and extractions: ``.<name>.<random>.part`` beside the final file."""


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
            raise UnreachableError(f"{current}: {exc}") from exc
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


def download(
    remote: RemoteFile, destination: Path, *, timeout: float = 60.0, progress: bool = True
) -> str:
    """Stream ``remote`` to ``destination`` atomically; return the sha256. Checks the prefix.

    The bytes go to a ``.part`` file beside ``destination``, renamed over it only once the
    checksum passes; a failed or corrupt download leaves nothing behind.
    """
    digest = hashlib.sha256()
    with atomic_path(destination, PART_SUFFIX) as temp:
        with open_url(remote.url, timeout) as response, temp.open("xb") as out:
            size = _copy(response, out, digest, remote.filename, progress)
        sha256 = digest.hexdigest()
        if not remote.matches(sha256):
            raise ChecksumError(
                f"{remote.url}: checksum mismatch: sha256 {sha256} does not start with "
                f"{remote.sha256_prefix} (from the file name); the download is corrupt or not "
                "the published file, and was discarded"
            )
    log.info("downloaded %s (%d bytes) to %s", remote.url, size, destination)
    return sha256
