"""Locust load for POST /colorize: ``locust -f loadtests/locustfile.py --host http://HOST:8000``.

Each user sends one image after the other (closed loop, no think time), so the number of users is
the concurrency. Settings (environment variables, so the plain ``locust`` command can use them):

- ``LOAD_IMAGE``: path of the image to send (default: a generated 512x384 grayscale JPEG)
- ``LOAD_QUERY``: query string for /colorize, e.g. ``boxes=[[10,10,200,300]]&format=jpeg``
- ``LOAD_MULTIPART``: ``1`` to send multipart/form-data (like ``curl -F``) instead of a raw body

Every response's ``Server-Timing`` header is collected in ``SERVER_TIMINGS`` (stage -> ms list),
which ``run_load.py`` summarises.
"""

from __future__ import annotations

import io
import mimetypes
import os
from collections import defaultdict
from pathlib import Path

from locust import constant, task
from locust.contrib.fasthttp import FastHttpUser

SERVER_TIMINGS: dict[str, list[float]] = defaultdict(list)


def _default_image() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 512)[None, :].repeat(384, axis=0)
    pixels = np.clip(ramp + rng.normal(0, 12, ramp.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _load_image() -> tuple[bytes, str]:
    path = os.environ.get("LOAD_IMAGE")
    if not path:
        return _default_image(), "image/jpeg"
    media = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return Path(path).read_bytes(), media


def _request() -> tuple[str, bytes, dict[str, str]]:
    """URL, body and headers of the request every user sends (built once, not per request)."""
    image, media_type = _load_image()
    query = os.environ.get("LOAD_QUERY", "")
    url = "/colorize" + (f"?{query}" if query else "")
    if os.environ.get("LOAD_MULTIPART", "0") != "1":
        return url, image, {"Content-Type": media_type}
    boundary = "locustboundary7d3f"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="image"\r\nContent-Type: {media_type}\r\n\r\n'
    )
    body = head.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


URL, BODY, HEADERS = _request()


def record_server_timing(header: str | None) -> None:
    """``queue;dur=1.20, detect;dur=3.4`` -> SERVER_TIMINGS['queue'].append(1.2), ..."""
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        if params.startswith("dur="):
            try:
                SERVER_TIMINGS[name].append(float(params[4:]))
            except ValueError:
                continue


class ColorizeUser(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = 10.0
    network_timeout = 120.0

    @task
    def colorize(self) -> None:
        with self.client.post(
            URL, data=BODY, headers=HEADERS, name="/colorize", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}")
                return
            record_server_timing(response.headers.get("Server-Timing"))
            response.success()
