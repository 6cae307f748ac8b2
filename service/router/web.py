"""The web page: ``/`` and ``/static/*``, plain files shipped inside the package (no build step).

The page calls the same ``POST /colorize`` (JSON variant) as any client. Its Content-Security-Policy
allows this origin only (plus ``blob:``/``data:`` images the page makes itself), so a page that
tried to reach another host would be stopped by the browser. The script is a set of ES modules
(``app.js`` imports the others), which browsers run only when served with a JavaScript MIME type.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def install_web_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets under ``/static/`` (both outside the OpenAPI)."""
    # StaticFiles takes the type from ``mimetypes``, whose table comes from the host (the Windows
    # registry can say text/plain for .js): module scripts must be served as JavaScript.
    mimetypes.add_type("text/javascript", ".js")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )


__all__ = ["STATIC_DIR", "install_web_page"]
