"""The loader over object storage (moto's S3 server) and over a flaky HTTP server, plus foreign shard layouts."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_pipeline.config import LoaderConfig
from data_pipeline.loader import build_loader
from mmfuse.config import load_config
from tests.loaderdata import flac, jpeg, make_dataset, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def config(train, *overrides):
    return load_config(LoaderConfig, [], [f"train={train}", "batch_size=4", "workers=1", "shuffle_window=5", *overrides])


def keys_of(loader):
    return [k for batch in loader for k in batch["__key__"]]


def test_streams_from_s3_like_from_disk(tmp_path, s3_server, s3fs_client):
    local = make_dataset(tmp_path / "ds", shards=3, per_shard=7)
    remote = f"{s3_server['url']}/loader/ds"
    for path in local.iterdir():
        s3fs_client.pipe_file(f"{remote.removeprefix('s3://')}/{path.name}", path.read_bytes())
    from_disk = keys_of(build_loader(config(local), 0, 1))
    from_s3 = keys_of(build_loader(config(remote), 0, 1))
    assert from_s3 == from_disk and len(from_s3) == 21
    brace = keys_of(build_loader(config(remote + "/shard-{000000..000002}.tar"), 0, 1))
    assert sorted(brace) == sorted(from_disk)


class FlakyRangeServer(BaseHTTPRequestHandler):
    """Serves files with Range support; the first read of each file past its middle drops the connection."""

    files: dict[str, bytes] = {}
    dropped: set[str] = set()
    requests = 0

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        type(self).requests += 1
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data) - 1
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else end, len(data) - 1)
        body = data[start : end + 1]
        self.send_response(206 if match else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if head:
            return
        if self.path.endswith(".tar") and self.path not in self.dropped and end > len(data) // 2 and len(body) > 1024:
            self.dropped.add(self.path)
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.close()  # mid-body reset: a transient failure
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path):
    local = make_dataset(tmp_path / "ds", shards=2, per_shard=30)
    FlakyRangeServer.files = {f"/ds/{p.name}": p.read_bytes() for p in local.iterdir()}
    FlakyRangeServer.dropped = set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyRangeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/ds", local
    server.shutdown()
    server.server_close()


def test_transient_failure_mid_shard_is_retried(flaky_server):
    url, local = flaky_server
    loader = build_loader(config(url, "read_retries=3"), 0, 1)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(keys_of(build_loader(config(local), 0, 1)))
    assert FlakyRangeServer.dropped == {"/ds/shard-000000.tar", "/ds/shard-000001.tar"}  # both failures happened
    assert loader.metrics().get("shard_truncated", 0) == 0 and loader.metrics()["samples"] == 60


def test_img2dataset_layout_without_sizes_json(tmp_path):
    """img2dataset: 000000000.jpg/.txt/.json in 00000.tar + 00000.parquet + 00000_stats.json, no sizes.json."""
    root = tmp_path / "img2ds"
    root.mkdir()
    for shard in range(2):
        samples = [{"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg(i), "txt": f"photo {i}".encode(),
                    "json": json.dumps({"url": f"http://x/{i}.jpg", "caption": f"photo {i}", "key": f"{shard:05d}{i:04d}",
                                        "status": "success", "width": 16, "height": 16}).encode()} for i in range(5)]
        write_tar(root / f"{shard:05d}.tar", samples)
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))
    loader = build_loader(config(f"{root}/{{00000..00001}}.tar"), 0, 1)
    batches = list(loader)
    assert sum(len(b["__key__"]) for b in batches) == 10
    assert all(b["has_image"].all() and b["has_text"].all() for b in batches)
    assert batches[0]["caption"][0].startswith("photo ")


def test_clap_layout_caption_from_json(tmp_path):
    """LAION-CLAP: N.flac + N.json with a "text" field, no caption member."""
    root = tmp_path / "clap"
    root.mkdir()
    samples = [{"__key__": str(i), "flac": flac(i, seconds=0.5), "json": json.dumps({"text": f"a tone number {i}", "original_data": {}}).encode()}
               for i in range(6)]
    write_tar(root / "0.tar", samples)
    (root / "sizes.json").write_text(json.dumps({"0.tar": 6}))
    loader = build_loader(config(root, "batch_size=6", "require=[audio,text]", "audio.frames=50"), 0, 1)
    (batch,) = list(loader)
    assert sorted(batch["caption"]) == sorted(f"a tone number {i}" for i in range(6))
    assert batch["has_audio"].all() and not batch["has_image"].any()
    assert batch["audio"].shape == (6, 64, 50) and batch["audio_mask"][:, :40].all()


def test_never_reads_pickles_from_a_shard(tmp_path):
    root = tmp_path / "evil"
    root.mkdir()
    write_tar(root / "e.tar", [{"__key__": "a", "txt": b"hello", "pyd": b"cos\nsystem\n(S'exit 1'\ntR.", "pth": b"\x80\x04junk"}])
    (root / "sizes.json").write_text(json.dumps({"e.tar": 1}))
    loader = build_loader(config(root, "batch_size=1"), 0, 1)
    (batch,) = list(loader)
    assert batch["caption"] == ["hello"] and set(loader.dataset.decoder.wanted).isdisjoint({"pyd", "pth", "pickle"})
