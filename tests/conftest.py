"""Shared fixtures: a real HTTP server with every failure a web crawl meets, and a real S3 endpoint (moto).

Both listen on 127.0.0.1 only. Worker processes spawned by the sharding stage reach them over the loopback like
any other client, so no fixture patches code under test.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

STALL_SECONDS = 3.0
"""How long the stalling paths hold a request: well past the tests' fetch.timeout (0.5 s), yet bounded so the
handler thread ends and the server shuts down promptly."""

LARGE_BODY = 300_000
"""Size of the too-large bodies; tests set fetch.max_bytes between the good images' size and this."""


def make_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small real JPEG whose pixels depend on ``seed`` (distinct seeds give distinct content hashes)."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([((x * 4 + seed * 37) % 256, (y * 5 + seed * 11) % 256, (seed * 53) % 256) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """Routes (GET only). ``/img/<n>.jpg`` is a good image; every other route is one way a fetch can go wrong."""

    protocol_version = "HTTP/1.1"
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
        route, _, rest = path.lstrip("/").partition("/")
        seed = sum(rest.encode()) if rest else 0
        if route == "img":
            self._send(200, make_jpeg(seed))
        elif route == "404":
            self._send(404, b"not here")
        elif route == "flaky503":  # first request fails, the retry succeeds
            self._send(503, b"busy") if hits == 1 else self._send(200, make_jpeg(1000 + seed))
        elif route == "flaky429":
            self._send(429, b"slow down", [("Retry-After", "0")]) if hits == 1 else self._send(200, make_jpeg(2000 + seed))
        elif route == "always503":
            self._send(503, b"busy")
        elif route == "stall":  # no response line within the client's timeout
            time.sleep(STALL_SECONDS)
            self._send(200, make_jpeg(3000))
        elif route == "stall-body":  # headers and the start of the body, then nothing
            self._start(200, [("Content-Length", "10000"), ("Content-Type", "image/jpeg")])
            self.wfile.write(make_jpeg(3001)[:100])
            self.wfile.flush()
            time.sleep(STALL_SECONDS)
            self.close_connection = True
        elif route == "loop":
            self._send(302, b"", [("Location", "/loop")])
        elif route == "noai":
            self._send(200, make_jpeg(4000 + seed), [("X-Robots-Tag", "noai")])
        elif route == "noai-repeated":  # the opt-out is in the second header; the first addresses another bot
            self._send(200, make_jpeg(4100 + seed), [("X-Robots-Tag", "otherbot: nofollow"), ("X-Robots-Tag", "noimageai")])
        elif route == "noai-otherbot":  # addressed to another bot only: not an opt-out for us
            self._send(200, make_jpeg(4200 + seed), [("X-Robots-Tag", "otherbot: noindex, noai")])
        elif route == "large":  # declared too large in Content-Length
            self._send(200, b"\xff" * LARGE_BODY)
        elif route == "large-undeclared":  # no Content-Length: only counting the body finds out
            self._start(200, [("Connection", "close"), ("Content-Type", "image/jpeg")])
            for _ in range(LARGE_BODY // 10_000):
                self.wfile.write(b"\xff" * 10_000)
            self.close_connection = True
        elif route == "reset":  # the connection dies before any response
            self._reset()
        elif route == "reset-body":  # the connection dies half-way through the body
            self._start(200, [("Content-Length", "10000"), ("Content-Type", "image/jpeg")])
            self.wfile.write(make_jpeg(3002)[:100])
            self.wfile.flush()
            self._reset()
        elif route == "empty":
            self._send(200, b"")
        else:
            self._send(404, b"no such route")

    def _start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:  # a list, not a dict: some routes repeat a header
            self.send_header(name, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        try:
            self._start(status, [("Content-Length", str(len(body))), ("Content-Type", "image/jpeg"), *headers])
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout); expected for the stalls
            self.close_connection = True

    def _reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), not an orderly close."""
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # keep test output readable
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5: on a loaded machine, 2 shard processes x 16 fetch threads overflow it and
    # a request fails before the handler sees it (seen once: a retried 503 counted 1 hit for 2 tries).
    request_queue_size = 128

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:  # clients that time out break pipes; not a failure
        pass


@pytest.fixture(scope="session")
def _http_server_session():
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=STALL_SECONDS + 2)


@pytest.fixture
def http_server(_http_server_session) -> str:
    """Base URL (``http://127.0.0.1:PORT``) of the test HTTP server; per-path hit counters start at zero."""
    with _http_server_session.lock:
        _http_server_session.hits.clear()
    host, port = _http_server_session.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture
def http_hits(_http_server_session, http_server) -> Counter:
    """Requests seen per path in this test (``hits["/always503"]``), for asserting how often a fetch retried."""
    return _http_server_session.hits


@pytest.fixture(scope="session")
def _moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_server, monkeypatch, request):
    """A fresh bucket on the session's moto S3 endpoint, with the standard AWS variables pointing at it.

    Yields ``{"bucket": name, "endpoint": url, "url": "s3://name"}``. The variables are set in ``os.environ`` so
    spawned worker processes inherit them; s3fs's instance cache is cleared before and after so no filesystem
    object (and no listing cache) outlives its test.
    """
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": _moto_server})
    fs.mkdir(bucket)
    yield {"bucket": bucket, "endpoint": _moto_server, "url": f"s3://{bucket}"}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3fs_client(s3_server):
    """An s3fs filesystem on the test endpoint that never answers from a stale listing cache."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]}, skip_instance_cache=True, use_listings_cache=False)
