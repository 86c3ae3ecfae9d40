"""Fetchers: bytes from a local path, an http(s) URL or any fsspec URL, with failures as reasons.

http: a timeout on connect and on every read, bounded retries with exponential backoff for transient failures
(5xx, 429, connection resets, timeouts) and none for permanent ones (other 4xx), a cap on redirects and on bytes,
and img2dataset's opt-out rule (an ``X-Robots-Tag`` with noai/noimageai/noindex/noimageindex skips the sample).
Many fetches run concurrently per process (the worker's thread pool); each thread keeps its own session.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import requests

from data_pipeline.config import FetchConfig
from data_pipeline.errors import SampleError
from data_pipeline.storage import filesystem

OPT_OUT_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


class Fetcher:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self._local = threading.local()

    def fetch(self, location: str) -> bytes:
        scheme = urlsplit(location).scheme
        if scheme in ("http", "https"):
            return self._fetch_http(location)
        if scheme in ("", "file"):
            return self._fetch_local(location)
        return self._fetch_fsspec(location)

    def _fetch_local(self, path: str) -> bytes:
        path = path.removeprefix("file://")
        try:
            with open(path, "rb") as f:
                data = f.read(self.cfg.max_bytes + 1)
        except FileNotFoundError:
            raise SampleError("file_not_found", path) from None
        except OSError as err:
            raise SampleError("read_error", f"{path}: {err.strerror}") from None
        return self._checked(data)

    def _fetch_fsspec(self, url: str) -> bytes:
        for attempt in range(self.cfg.retries + 1):
            try:
                fs, inner = filesystem(url)
                with fs.open(inner, "rb") as f:
                    return self._checked(f.read(self.cfg.max_bytes + 1))
            except FileNotFoundError:
                raise SampleError("file_not_found", url) from None
            except PermissionError:
                raise SampleError("permission_denied", url) from None
            except Exception as err:  # botocore/aiohttp errors have no common base below Exception
                if attempt == self.cfg.retries:
                    raise SampleError("read_error", type(err).__name__) from None
                time.sleep(self.cfg.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _checked(self, data: bytes) -> bytes:
        if len(data) > self.cfg.max_bytes:
            raise SampleError("too_large", f"more than {self.cfg.max_bytes} bytes")
        if not data:
            raise SampleError("empty_file")
        return data

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.max_redirects = self.cfg.max_redirects
            session.headers["User-Agent"] = self.cfg.user_agent
            self._local.session = session
        return session

    def _fetch_http(self, url: str) -> bytes:
        reason, detail = "", ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff * 2 ** (attempt - 1))
            try:
                return self._http_once(url)
            except _Transient as err:
                reason, detail = err.reason, err.detail
        raise SampleError(reason, f"{detail} (after {self.cfg.retries + 1} tries)")

    def _http_once(self, url: str) -> bytes:
        timeout = self.cfg.timeout
        try:
            with self._session().get(url, timeout=(timeout, timeout), stream=True) as response:
                status = response.status_code
                if status in TRANSIENT_STATUS:
                    raise _Transient(f"http_{status}", response.reason or "")
                if status >= 400:
                    raise SampleError(f"http_{status}", response.reason or "")
                if self.cfg.honor_opt_out and opted_out(response.headers.get("X-Robots-Tag", "")):
                    raise SampleError("opt_out", response.headers.get("X-Robots-Tag", ""))
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
                    raise SampleError("too_large", f"Content-Length {declared}")
                chunks, size = [], 0
                for chunk in response.iter_content(_CHUNK):
                    size += len(chunk)
                    if size > self.cfg.max_bytes:
                        raise SampleError("too_large", f"more than {self.cfg.max_bytes} bytes")
                    chunks.append(chunk)
        except requests.TooManyRedirects:
            raise SampleError("too_many_redirects") from None
        except (requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            # A read that stalls mid-body surfaces as a ConnectionError wrapping ReadTimeoutError, see below.
            raise _Transient("timeout", type(err).__name__) from None
        except requests.ConnectionError as err:
            if "timed out" in str(err).lower() or "timeout" in type(err.__context__).__name__.lower():
                raise _Transient("timeout", "read timed out") from None
            raise _Transient("connection_error", type(err).__name__) from None
        except requests.RequestException as err:
            raise SampleError("request_error", type(err).__name__) from None
        if not size:
            raise SampleError("empty_file")
        return b"".join(chunks)


class _Transient(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def opted_out(header: str) -> bool:
    """True when an X-Robots-Tag value forbids AI use or indexing for every bot or for us.

    Directives may be scoped to a bot (``otherbot: noai``); those scoped to another bot do not apply.
    """
    for part in header.lower().split(","):
        part = part.strip()
        if ":" in part:
            agent, _, part = part.partition(":")
            if agent.strip() not in ("*", "mmfuse"):
                continue
        if set(part.split()) & OPT_OUT_DIRECTIVES:
            return True
    return False
