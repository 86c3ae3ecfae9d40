"""fsspec access to local folders and object stores, atomic commits, and credential-free URLs for logs.

An S3 endpoint other than AWS comes from the standard ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` variable
(some s3fs/botocore combinations ignore them, so it is passed explicitly); credentials stay in the environment
and never reach a config, a log line or an error message.
"""

from __future__ import annotations

import logging
import os
import time
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs

from mmfuse.redact import redact, redact_text

log = logging.getLogger(__name__)


OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``url`` and the path inside it.

    Object stores get no listing cache: worker processes write the shards that the parent then looks for, and
    a cached listing (s3fs keeps one per instance, for the life of the process) would not show them.
    """
    options: dict = {}
    protocol = urlsplit(url).scheme
    if protocol in OBJECT_STORES:
        options["use_listings_cache"] = False
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return url_to_fs(url, **options)


def is_local(url: str) -> bool:
    return urlsplit(url).scheme in ("", "file")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def commit_file(local_path: str, fs: fsspec.AbstractFileSystem, remote_path: str, retries: int = 3) -> None:
    """Make ``local_path`` visible at ``remote_path`` whole or not at all.

    Locally a rename; on an object store one upload (an object is not visible until its upload completes),
    retried with exponential backoff. The local file is removed afterwards; after a failure it is left for the
    caller to remove.
    """
    if _is_local_fs(fs):
        os.replace(local_path, remote_path)
        return
    _retrying(lambda: fs.put_file(local_path, remote_path), "upload to", fs.unstrip_protocol(remote_path), retries)
    os.remove(local_path)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, retries: int = 3) -> None:
    """Write a small file atomically (temp name + rename locally; one PUT on object stores)."""
    if _is_local_fs(fs):
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")  # hidden: never mistaken for a dataset file
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    _retrying(lambda: fs.pipe_file(path, data), "write to", fs.unstrip_protocol(path), retries)


# A missing bucket or a refused credential does not heal on its own: fail at once instead of backing off.
_PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def _retrying(action, what: str, url: str, retries: int) -> None:
    """Run ``action`` (one upload) with exponential backoff; the error names ``url`` without credentials."""
    for attempt in range(retries + 1):
        try:
            action()
            return
        except Exception as err:  # network errors come in many types (botocore, aiohttp, OSError)
            if attempt == retries or isinstance(err, _PERMANENT):
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                detail = redact_text(str(err)) or type(err).__name__
                raise OSError(f"{what} {redact(url)} failed after {tries}: {detail}") from None
            wait = 0.5 * 2**attempt
            log.warning("%s %s failed (%s); retrying in %.1fs", what, redact(url), type(err).__name__, wait)
            time.sleep(wait)


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
