"""API keys: the ``name:key`` format of ``COLORIZE_API_KEYS`` and ``COLORIZE_API_KEY_FILE``.

Parsed once, where the settings are validated; the router's middleware checks requests against
the result (``service.router.auth``).
"""

from __future__ import annotations

from pathlib import Path

ANONYMOUS = "anonymous"  # the key-name label when keys are off


class ApiKeyFormatError(ValueError):
    pass


def parse_api_keys(text: str, source: str) -> dict[str, str]:
    """``name:key`` entries separated by commas or new lines (``#`` starts a comment line)."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise ApiKeyFormatError(
                f"{source}: an entry is not 'name:key' (entries are name:key separated by commas "
                "or new lines; the key is not shown here)"
            )
        if len(key) < 16:
            raise ApiKeyFormatError(
                f"{source}: the key named {name!r} is shorter than 16 characters; use a long "
                "random key, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if name in keys:
            raise ApiKeyFormatError(f"{source}: the key name {name!r} appears twice")
        keys[name] = key
    return keys


def load_api_keys(api_keys: str | None, api_key_file: Path | None) -> dict[str, str]:
    """Name -> key from the setting and the file (empty: authentication is off)."""
    keys = parse_api_keys(api_keys or "", "COLORIZE_API_KEYS")
    if api_key_file is not None:
        from_file = parse_api_keys(api_key_file.read_text(encoding="utf-8"), str(api_key_file))
        for name in from_file.keys() & keys.keys():
            raise ApiKeyFormatError(
                f"the key name {name!r} is in both COLORIZE_API_KEYS and the file"
            )
        keys.update(from_file)
    return keys
