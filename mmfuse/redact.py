"""Credential-free text: URLs without user:password@, fragments or query strings (signed URLs carry their secrets
there), for everything mmfuse writes or prints: saved configs, log lines, error messages."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """Drop user:password@ and the fragment, and replace the query string by ``<redacted>`` (signed URLs carry
    their secrets there; the marker tells a reader that the original had one). Paths without a scheme are left
    alone: ``?`` is a legal file-name character."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparsable netloc ("http://[bad"): cut what could hold a secret by hand
        scheme, _, rest = url.partition("://")
        rest = rest.split("#", 1)[0]
        rest, query, _ = rest.partition("?")
        rest = rest.split("/", 1)
        rest[0] = rest[0].rsplit("@", 1)[-1]
        return f"{scheme}://{'/'.join(rest)}" + ("?<redacted>" if query else "")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """Redact every URL inside a message (exception texts often embed the full URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def redact_values(value: Any) -> Any:
    """``value`` (a config as nested dicts and lists) with every URL in its strings redacted: what is saved."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(item) for item in value]
    return value
