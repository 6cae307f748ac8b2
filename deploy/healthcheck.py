"""Container HEALTHCHECK: exit 0 when the service's readiness URL answers 200, else 1.

URL: COLORIZE_HEALTHCHECK_URL, or http://127.0.0.1:$COLORIZE_PORT/readyz (port 8000 by default).
Standard library only, so it works in any image without curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def readiness_url() -> str:
    explicit = os.environ.get("COLORIZE_HEALTHCHECK_URL")
    if explicit:
        return explicit
    return f"http://127.0.0.1:{os.environ.get('COLORIZE_PORT', '8000')}/readyz"


def main() -> int:
    url = readiness_url()
    if not url.startswith(("http://", "https://")):
        sys.stderr.write(f"healthcheck: refusing non-HTTP URL {url!r}\n")
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 (checked above)
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        sys.stderr.write(f"healthcheck: {url}: {error}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"healthcheck: {url} answered {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
