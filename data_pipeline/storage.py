"""fsspec access to local folders and object stores, atomic commits, and credential-free URLs for logs.

An S3 endpoint other than AWS comes from the standard ``AWS_ENDPOINT_URL`` variable (some s3fs/botocore
combinations ignore it, so it is passed explicitly); credentials stay in the environment and never reach a
config, a log line or an error message.
"""

from __future__ import annotations

import logging
import os
import re
import time
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path inside it."""
    options = {}
    protocol = urlsplit(url).scheme
    if protocol in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        options["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    return url_to_fs(url, **options)


def is_local(url: str) -> bool:
    return urlsplit(url).scheme in ("", "file")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def redact(url: str) -> str:
    """Drop user:password@ and the query string (signed URLs carry their secrets there)."""
    if not isinstance(url, str) or "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]+")


def redact_text(text: str) -> str:
    """Redact every URL inside a message (exception texts often embed the full URL)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def commit_file(local_path: str, fs: fsspec.AbstractFileSystem, remote_path: str, retries: int = 3) -> None:
    """Make ``local_path`` visible at ``remote_path`` whole or not at all.

    Locally a rename; on an object store one upload (an object is not visible until its upload completes),
    retried with exponential backoff. The local file is removed afterwards.
    """
    if _is_local_fs(fs):
        os.replace(local_path, remote_path)
        return
    for attempt in range(retries + 1):
        try:
            fs.put_file(local_path, remote_path)
            break
        except Exception as err:  # network errors come in many types (botocore, aiohttp, OSError)
            if attempt == retries:
                raise OSError(f"upload to {redact(remote_path)} failed after {retries + 1} tries: {redact_text(str(err))}") from None
            wait = 0.5 * 2**attempt
            log.warning("upload of %s failed (%s); retrying in %.1fs", redact(remote_path), type(err).__name__, wait)
            time.sleep(wait)
    os.remove(local_path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, retries: int = 3) -> None:
    """Write a small file atomically (temp name + rename locally; one PUT on object stores)."""
    if _is_local_fs(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    for attempt in range(retries + 1):
        try:
            fs.pipe_file(path, data)
            return
        except Exception as err:
            if attempt == retries:
                raise OSError(f"write to {redact(path)} failed: {redact_text(str(err))}") from None
            time.sleep(0.5 * 2**attempt)


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
