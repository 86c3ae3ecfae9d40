"""Sharding from a real HTTP server that fails in every way a crawl meets: each failure lands in its own reason,
transient ones heal by retry, and the per-shard parquet records every row with its status."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.shard import stage as shard
from data_pipeline.config import FetchConfig, ShardConfig, VerifyConfig
from data_pipeline.errors import SampleError
from data_pipeline.shard.fetchers import Fetcher
from data_pipeline.shard.readers import _cached_rows
from data_pipeline.shard.verify import verify
from mmfuse.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RETRIES = 1
MAX_REDIRECTS = 3
SECRET = "hunter2-SIGNATURE"

# path on the test server → the reason its row fails with ("" = written)
PATHS = {
    "img/0.jpg": "",
    "img/1.jpg": "",
    "img/2.jpg": "",
    "flaky503/a.jpg": "",  # 503, then 200 on the retry
    "flaky429/a.jpg": "",  # 429, then 200 on the retry
    "noai-otherbot": "",  # an opt-out addressed to another bot
    "404": "http_404",
    "always503": "http_503",
    "stall": "timeout",  # no response line within fetch.timeout
    "stall-body": "timeout",  # the body stops half-way
    "loop": "too_many_redirects",
    "noai": "opt_out",
    "noai-repeated": "opt_out",  # the opt-out is in a second X-Robots-Tag header
    "large": "too_large",  # Content-Length says so
    "large-undeclared": "too_large",  # only counting the body says so
    "reset": "connection_error",  # closed before any response
    "reset-body": "connection_error",  # closed half-way through the body
}


@pytest.fixture(autouse=True)
def _fresh_manifest_cache():
    _cached_rows.cache_clear()
    yield
    _cached_rows.cache_clear()


def _url(base: str, path: str) -> str:
    return f"{base}/{path}"


def _write_manifest(path, urls: list[str]) -> None:
    table = pa.table({"image": urls, "text": [f"caption {i}" for i in range(len(urls))], "row": list(range(len(urls)))})
    pacsv.write_csv(table, path)


def _config(manifest, output, *extra: str) -> ShardConfig:
    return load_config(
        ShardConfig,
        overrides=[
            f"input.path={manifest}",
            f"output.path={output}",
            "output.samples_per_shard=5",
            "fetch.timeout=0.5",
            f"fetch.retries={RETRIES}",
            "fetch.backoff=0.05",
            f"fetch.max_redirects={MAX_REDIRECTS}",
            "fetch.max_bytes=100000",
            "image.size=32",
            "progress=false",
            *extra,
        ],
    )


def _tar_members(folder) -> dict[str, bytes]:
    members = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    return members


@pytest.mark.parametrize("processes", [1, 2])
def test_every_failure_has_its_reason(http_server, http_hits, tmp_path, processes):
    urls = [_url(http_server, p) for p in PATHS]
    # Credentials and a signed query must not reach the records, the json members or dataset.json.
    secret_url = http_server.replace("http://", f"http://user:{SECRET}@") + f"/img/9.jpg?X-Amz-Signature={SECRET}"
    urls.append(secret_url)
    _write_manifest(tmp_path / "manifest.csv", urls)
    out = tmp_path / "out"

    summary = shard.run(_config(tmp_path / "manifest.csv", out, f"processes={processes}"))

    expected_failed = Counter(reason for reason in PATHS.values() if reason)
    expected_written = len(urls) - sum(expected_failed.values())
    assert summary["failed"] == dict(expected_failed)
    assert summary["written"] == expected_written == 7
    assert summary["input_rows"] == len(urls)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["failed"] == dict(expected_failed) and dataset["written"] == expected_written

    per_shard: Counter[str] = Counter()
    for stats_file in sorted(out.glob("*_stats.json")):
        per_shard.update(json.loads(stats_file.read_text())["failed"])
    assert per_shard == expected_failed
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == expected_written

    records = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(records) == len(urls)
    by_row = {r["row"]: r for r in records}
    for row, path in enumerate(PATHS):
        record, reason = by_row[row], PATHS[path]
        assert record["image"] == _url(http_server, path)
        assert (record["status"], record["error"]) == (("failed", reason) if reason else ("success", None)), path
    assert "after 2 tries" in by_row[list(PATHS).index("always503")]["detail"]
    assert by_row[len(PATHS)]["status"] == "success"
    assert by_row[len(PATHS)]["image"] == f"{http_server}/img/9.jpg?<redacted>"

    members = _tar_members(out)
    captions = {data.decode() for name, data in members.items() if name.endswith(".txt")}
    assert captions == {f"caption {row}" for row, path in enumerate(PATHS) if not PATHS[path]} | {f"caption {len(PATHS)}"}
    for name, data in members.items():
        assert SECRET.encode() not in data, name
        if name.endswith(".jpg"):
            assert Image.open(io.BytesIO(data)).size == (43, 32)  # 64x48 resized to shorter side 32
    assert SECRET not in (out / "dataset.json").read_text()
    assert not any(SECRET.encode() in p.read_bytes() for p in out.iterdir())
    assert verify(VerifyConfig(path=str(out))).ok

    # Permanent failures are asked once; transient ones retries + 1 times; redirects are followed to the cap.
    assert http_hits["/404"] == 1
    assert http_hits["/noai"] == 1
    assert http_hits["/large"] == 1
    assert http_hits["/always503"] == RETRIES + 1
    assert http_hits["/stall"] == http_hits["/reset"] == http_hits["/reset-body"] == RETRIES + 1
    assert http_hits["/flaky503/a.jpg"] == http_hits["/flaky429/a.jpg"] == 2
    assert http_hits["/loop"] == MAX_REDIRECTS + 1


def test_opt_out_can_be_disabled(http_server, tmp_path):
    paths = ["noai", "noai-repeated", "img/0.jpg"]
    _write_manifest(tmp_path / "manifest.csv", [_url(http_server, p) for p in paths])

    honoured = shard.run(_config(tmp_path / "manifest.csv", tmp_path / "honoured", "processes=1"))
    ignored = shard.run(_config(tmp_path / "manifest.csv", tmp_path / "ignored", "processes=1", "fetch.honor_opt_out=false"))

    assert honoured["failed"] == {"opt_out": 2} and honoured["written"] == 1
    assert ignored["failed"] == {} and ignored["written"] == 3
    assert json.loads((tmp_path / "ignored" / "dataset.json").read_text())["config"]["fetch"]["honor_opt_out"] is False


@pytest.mark.parametrize(
    "path, reason, detail",
    [
        ("404", "http_404", "Not Found"),
        ("always503", "http_503", "(after 3 tries)"),
        ("stall-body", "timeout", "read timed out"),
        ("reset-body", "connection_error", "ConnectionResetError"),
        ("reset", "connection_error", "ConnectionResetError"),
        ("loop", "too_many_redirects", "more than 2"),
        ("large-undeclared", "too_large", "more than 100000 bytes"),
        ("empty", "empty_file", ""),
        ("noai-repeated", "opt_out", "noimageai"),
    ],
)
def test_fetcher_reason_and_detail(http_server, path, reason, detail):
    fetcher = Fetcher(FetchConfig(timeout=0.5, retries=2, backoff=0.01, max_redirects=2, max_bytes=100_000))
    with pytest.raises(SampleError) as failure:
        fetcher.fetch(_url(http_server, path))
    assert failure.value.reason == reason
    assert detail in failure.value.detail


def test_connection_refused_is_a_connection_error():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher = Fetcher(FetchConfig(timeout=0.5, retries=1, backoff=0.01))
    with pytest.raises(SampleError) as failure:
        fetcher.fetch(f"http://127.0.0.1:{port}/a.jpg")
    assert failure.value.reason == "connection_error"
    assert "(after 2 tries)" in failure.value.detail


def test_fetcher_returns_the_body_and_obeys_retries(http_server, http_hits):
    from tests.conftest import make_jpeg

    fetcher = Fetcher(FetchConfig(timeout=2, retries=0))
    assert fetcher.fetch(_url(http_server, "img/abc.jpg")) == make_jpeg(sum(b"abc.jpg"))
    with pytest.raises(SampleError) as failure:  # no retries: the first 503 is final
        fetcher.fetch(_url(http_server, "flaky503/b.jpg"))
    assert failure.value.reason == "http_503"
    assert http_hits["/img/abc.jpg"] == http_hits["/flaky503/b.jpg"] == 1
