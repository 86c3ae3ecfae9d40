"""Fetchers: bytes from a local path, an http(s) URL or any fsspec URL, with failures as reasons.

http: a timeout on connect and on every read, bounded retries with exponential backoff for transient failures
(5xx, 429, connection resets, timeouts) and none for permanent ones (other 4xx), a cap on redirects and on bytes,
and img2dataset's opt-out rule (an ``X-Robots-Tag`` with noai/noimageai/noindex/noimageindex skips the sample).
Many fetches run concurrently per process (the worker's thread pool); each thread keeps its own session.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from urllib.parse import urlsplit

from data_pipeline.config import FetchConfig
from data_pipeline.errors import SampleError, sample_step
from mmfuse.storage import filesystem
from mmfuse.redact import redact

OPT_OUT_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}
_VALUED_DIRECTIVES = {"max-snippet", "max-image-preview", "max-video-preview", "unavailable_after"}
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_CHUNK = 1 << 16


class Fetcher:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self._local = threading.local()
        # The product token robots directives may address us by: "mmfuse" from "mmfuse/0.1 (+https://...)".
        self._agent = (cfg.user_agent.split("/", 1)[0].split() or ["mmfuse"])[0].lower()

    def fetch(self, location: str) -> bytes:
        """The bytes at ``location``; SampleError with the reason when they cannot be had (an error no branch
        below names, a malformed URL say, is a read_error of this sample with its type)."""
        with sample_step("read_error"):
            scheme = urlsplit(location).scheme
            if scheme in ("http", "https"):
                return self._fetch_http(location)
            if scheme in ("", "file"):
                return self._fetch_local(location)
            return self._fetch_fsspec(location)

    def _fetch_local(self, path: str) -> bytes:
        path = path.removeprefix("file://")
        try:
            # Only regular files are opened: open() on a named pipe blocks until a writer comes (forever), a device
            # may never end (/dev/zero) or act on being opened. A stat is the price, next to a decode's milliseconds.
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise SampleError("not_a_file", f"{path}: {_file_kind(mode)}")
            with open(path, "rb") as f:
                # Read exactly the file's size: a max_bytes-sized read buffer would cost an allocation per file.
                size = os.fstat(f.fileno()).st_size
                if size > self.cfg.max_bytes:
                    raise SampleError("too_large", f"{size} bytes, more than {self.cfg.max_bytes}")
                data = f.read(size + 1 if size else self.cfg.max_bytes + 1)
        except FileNotFoundError:
            raise SampleError("file_not_found", path) from None
        except PermissionError:
            raise SampleError("permission_denied", path) from None
        except OSError as err:
            raise SampleError("read_error", f"{path}: {err.strerror}") from None
        except ValueError as err:  # a NUL byte in the path
            raise SampleError("bad_path", f"{path!r}: {err}") from None
        return self._checked(data)

    def _fetch_fsspec(self, url: str) -> bytes:
        for attempt in range(self.cfg.retries + 1):
            try:
                fs, inner = filesystem(url)
                with fs.open(inner, "rb") as f:
                    return self._checked(f.read(self.cfg.max_bytes + 1))
            except SampleError:  # too_large / empty_file: a property of the object, not worth a retry
                raise
            except FileNotFoundError:
                raise SampleError("file_not_found", redact(url)) from None
            except PermissionError:
                raise SampleError("permission_denied", redact(url)) from None
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
        import requests  # imported on the http path only: local and object-store sharding never pay for it

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
        import requests

        timeout = self.cfg.timeout
        try:
            with self._session().get(url, timeout=(timeout, timeout), stream=True) as response:
                status = response.status_code
                if status in TRANSIENT_STATUS:
                    raise _Transient(f"http_{status}", response.reason or "")
                if status >= 400:
                    raise SampleError(f"http_{status}", response.reason or "")
                if self.cfg.honor_opt_out:
                    for value in _header_values(response, "X-Robots-Tag"):
                        if opted_out(value, self._agent):
                            raise SampleError("opt_out", value)
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
            raise SampleError("too_many_redirects", f"more than {self.cfg.max_redirects}") from None
        except requests.Timeout as err:  # connect timeout, or no response line in time
            raise _Transient("timeout", type(err).__name__) from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            # A body read that stalls is raised by iter_content as ConnectionError(ReadTimeoutError); a connection
            # that breaks mid-body (reset, short read) as ChunkedEncodingError(ProtocolError), whatever the framing.
            if _caused_by_timeout(err):
                raise _Transient("timeout", "read timed out") from None
            raise _Transient("connection_error", _root_cause_name(err)) from None
        except requests.RequestException as err:
            raise SampleError("request_error", type(err).__name__) from None
        if not size:
            raise SampleError("empty_file")
        return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _causes(err: BaseException):
    """``err`` and what it wraps: requests and urllib3 keep the underlying error in ``args[0]`` or ``reason``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        inner = getattr(err, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in err.args if isinstance(a, BaseException)), None)
        err = inner or err.__cause__ or err.__context__


def _caused_by_timeout(err: BaseException) -> bool:
    import urllib3

    # Not urllib3's TimeoutError base: its NewConnectionError (connection refused) subclasses ConnectTimeoutError.
    return any(isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) for e in _causes(err))


def _root_cause_name(err: BaseException) -> str:
    """The innermost error's type (``ConnectionResetError``, ``NewConnectionError``): says what broke without
    repeating the message, which embeds the host and path."""
    return type(list(_causes(err))[-1]).__name__


class _Transient(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _header_values(response: requests.Response, name: str) -> list[str]:
    """Each occurrence of a header separately: requests joins repeated headers with ", ", which would scope a
    second ``X-Robots-Tag: noai`` to the bot named in the first (``otherbot: noindex``)."""
    raw = getattr(response.raw, "headers", None)
    if raw is not None and hasattr(raw, "getlist"):
        return raw.getlist(name)
    value = response.headers.get(name)
    return [value] if value else []


def opted_out(header: str, agent: str = "mmfuse") -> bool:
    """True when one X-Robots-Tag value forbids AI use or indexing for every bot or for ``agent``.

    A value may name a bot (``otherbot: noindex, noai``); the directives after a bot name apply to that bot
    only, until the next bot name. Directives that carry their own value after a colon (``max-snippet: 20``,
    ``unavailable_after: 25 Jun 2030``) are not bot names.
    """
    scope = "*"
    for token in header.lower().split(","):
        name, colon, rest = token.partition(":")
        if colon and name.strip() not in _VALUED_DIRECTIVES:
            scope, token = name.strip(), rest
        if scope in ("*", agent) and set(token.split()) & OPT_OUT_DIRECTIVES:
            return True
    return False
