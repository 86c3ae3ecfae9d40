"""Sharding to and from a real S3 endpoint (moto's server on the loopback), compared with a local run."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.shard import stage as shard
from data_pipeline.config import OutputConfig, ShardConfig, VerifyConfig
from data_pipeline.shard.readers import _cached_rows
from data_pipeline.shard.verify import verify
from data_pipeline.shard.writer import ShardWriter
from mmfuse.config import load_config
from tests.conftest import make_jpeg

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NUM_ROWS = 7
SAMPLES_PER_SHARD = 3  # 3 shards: 3 + 3 + 1
SHARDS = ["shard-000000", "shard-000001", "shard-000002"]


@pytest.fixture(autouse=True)
def _fresh_manifest_cache():
    _cached_rows.cache_clear()
    yield
    _cached_rows.cache_clear()


@pytest.fixture
def raw(tmp_path):
    """A local folder with a few real JPEGs and a manifest that names them by relative path."""
    root = tmp_path / "raw"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(NUM_ROWS):
        (root / "img" / f"{i}.jpg").write_bytes(make_jpeg(i))
        rows.append({"image": f"img/{i}.jpg", "text": f"a picture number {i}", "label": i})
    pq.write_table(pa.Table.from_pylist(rows), root / "manifest.parquet")
    return root


def _config(input_path: str, output_path: str, *extra: str) -> ShardConfig:
    return load_config(
        ShardConfig,
        overrides=[
            f"input.path={input_path}",
            f"output.path={output_path}",
            f"output.samples_per_shard={SAMPLES_PER_SHARD}",
            "image.size=32",
            "fetch.threads=2",
            "fetch.backoff=0.05",
            "progress=false",
            "processes=1",
            *extra,
        ],
    )


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _upload_folder(fs, local, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_shards_on_s3_equal_a_local_run_and_verify(raw, tmp_path, s3_server, s3fs_client):
    local_out = tmp_path / "local"
    remote = f"{s3_server['url']}/datasets/demo"
    local_summary = shard.run(_config(raw / "manifest.parquet", local_out))
    # Two worker processes: they inherit the endpoint and credentials from the environment, and the parent must
    # see the objects they wrote when it writes sizes.json and dataset.json.
    remote_summary = shard.run(_config(raw / "manifest.parquet", remote, "processes=2"))

    root = f"{s3_server['bucket']}/datasets/demo"
    names = {path.rsplit("/", 1)[-1] for path in s3fs_client.ls(root)}
    expected = {f"{s}{suffix}" for s in SHARDS for suffix in (".tar", ".parquet", "_stats.json")}
    assert names == expected | {"sizes.json", "dataset.json"}

    for name in SHARDS:
        remote_tar = s3fs_client.cat_file(f"{root}/{name}.tar")
        local_tar = (local_out / f"{name}.tar").read_bytes()
        assert _members(remote_tar) == _members(local_tar)
        assert remote_tar == local_tar  # the writer is deterministic: same rows, same bytes
        assert pq.read_table(io.BytesIO(s3fs_client.cat_file(f"{root}/{name}.parquet"))).to_pylist() == (
            pq.read_table(local_out / f"{name}.parquet").to_pylist()
        )
        remote_stats = json.loads(s3fs_client.cat_file(f"{root}/{name}_stats.json"))
        local_stats = json.loads((local_out / f"{name}_stats.json").read_text())
        assert remote_stats["written"] == local_stats["written"] and remote_stats["failed"] == local_stats["failed"] == {}
        assert remote_stats["bytes"] == local_stats["bytes"]

    sizes = json.loads(s3fs_client.cat_file(f"{root}/sizes.json"))
    assert sizes == json.loads((local_out / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    dataset = json.loads(s3fs_client.cat_file(f"{root}/dataset.json"))
    assert dataset["written"] == remote_summary["written"] == local_summary["written"] == NUM_ROWS
    assert dataset["config"]["output"]["path"] == remote

    report = verify(VerifyConfig(path=remote))
    assert report.ok, report.problems
    assert (report.shards, report.samples) == (3, NUM_ROWS)


def test_input_read_from_s3(raw, tmp_path, s3_server, s3fs_client):
    _upload_folder(s3fs_client, raw, f"{s3_server['bucket']}/raw")
    remote_in = f"{s3_server['url']}/raw/manifest.parquet"
    from_s3 = tmp_path / "from_s3"
    from_local = tmp_path / "from_local"
    summary = shard.run(_config(remote_in, from_s3))
    shard.run(_config(raw / "manifest.parquet", from_local))

    assert summary["written"] == NUM_ROWS and summary["failed"] == {}
    for name in SHARDS:
        got, want = _members((from_s3 / f"{name}.tar").read_bytes()), _members((from_local / f"{name}.tar").read_bytes())
        assert got.keys() == want.keys()
        for member in got:
            if member.endswith(".json"):
                # Only the recorded source differs: it names the object the image came from.
                meta, local_meta = json.loads(got[member]), json.loads(want[member])
                assert meta.pop("source")["image"].startswith(f"{s3_server['url']}/raw/img/")
                local_meta.pop("source")
                assert meta == local_meta
            else:
                assert got[member] == want[member], member


def test_missing_object_in_s3_input_is_a_reason(raw, tmp_path, s3_server, s3fs_client):
    _upload_folder(s3fs_client, raw, f"{s3_server['bucket']}/raw")
    s3fs_client.rm_file(f"{s3_server['bucket']}/raw/img/4.jpg")
    summary = shard.run(_config(f"{s3_server['url']}/raw/manifest.parquet", tmp_path / "out"))
    assert summary["failed"] == {"file_not_found": 1}
    assert summary["written"] == NUM_ROWS - 1
    table = pq.read_table(tmp_path / "out" / "shard-000001.parquet").to_pylist()
    failed = [r for r in table if r["status"] == "failed"]
    assert [(r["image"], r["error"]) for r in failed] == [(f"{s3_server['url']}/raw/img/4.jpg", "file_not_found")]


def test_rerun_skips_finished_shards(raw, s3_server, s3fs_client):
    remote = f"{s3_server['url']}/ds"
    root = f"{s3_server['bucket']}/ds"
    # Two processes: the parent lists the finished shards before the workers write, and must not answer from
    # that listing when it collects their stats afterwards.
    cfg = _config(raw / "manifest.parquet", remote, "processes=2")
    shard.run(cfg)
    original = {name: s3fs_client.cat_file(f"{root}/{name}.tar") for name in SHARDS}
    stats_before = s3fs_client.cat_file(f"{root}/shard-000000_stats.json")
    # Mark shard 0's tar so a rewrite would show, and unfinish shards 1 and 2 (no stats file = not committed).
    s3fs_client.pipe_file(f"{root}/shard-000000.tar", b"left alone")
    s3fs_client.rm_file(f"{root}/shard-000001_stats.json")
    s3fs_client.rm_file(f"{root}/shard-000002_stats.json")

    summary = shard.run(cfg)

    assert s3fs_client.cat_file(f"{root}/shard-000000.tar") == b"left alone"
    assert s3fs_client.cat_file(f"{root}/shard-000000_stats.json") == stats_before
    for name in ("shard-000001", "shard-000002"):
        assert s3fs_client.cat_file(f"{root}/{name}.tar") == original[name]
        assert s3fs_client.exists(f"{root}/{name}_stats.json")
    assert summary["written"] == NUM_ROWS and summary["shards"] == 3


def test_no_credentials_in_outputs_or_logs(raw, s3_server, s3fs_client, monkeypatch, caplog, capsys):
    secret = "Sup3rS3cretKeyThatMustNeverLeak"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key pair
    caplog.set_level(logging.INFO)
    remote = f"{s3_server['url']}/private"
    _upload_folder(s3fs_client, raw, f"{s3_server['bucket']}/raw")
    shard.run(_config(f"{s3_server['url']}/raw/manifest.parquet", remote))

    root = f"{s3_server['bucket']}/private"
    written = {path: s3fs_client.cat_file(path) for path in s3fs_client.find(root)}
    assert len(written) == 3 * 3 + 2
    for path, data in written.items():
        assert secret.encode() not in data, path
        if path.endswith(".tar"):
            for member, payload in _members(data).items():
                assert secret.encode() not in payload, member
    out = capsys.readouterr()
    assert "written" in out.err  # the summary table was printed, and it is clean
    assert secret not in out.out + out.err
    assert "shards planned" in caplog.text
    assert secret not in caplog.text


def test_failed_upload_leaves_nothing_visible(tmp_path, s3_server, s3fs_client, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the writer stages its local copies
    missing = f"{s3_server['bucket']}-does-not-exist"
    writer = ShardWriter(OutputConfig(path=f"s3://{missing}/ds", upload_retries=2), 0)
    writer.write({"__key__": "0000000000", "jpg": make_jpeg(1), "txt": b"a caption"})
    with pytest.raises(OSError) as failure:
        writer.close({"bytes": {}})
    writer.abort()  # what the worker does with any failure

    message = str(failure.value)
    assert f"s3://{missing}/ds/shard-000000.tar" in message
    assert "bucket does not exist" in message
    assert "after 1 try" in message  # a missing bucket is not retried
    assert not s3fs_client.exists(missing)
    assert not s3fs_client.exists(f"{missing}/ds/shard-000000_stats.json")
    assert list(tmp_path.iterdir()) == []  # the staged tar and parquet are gone too


def test_filesystem_sees_objects_written_by_another_process(s3_server, s3fs_client):
    """The parent lists a prefix, workers (other clients) add objects, the parent looks for them: no stale
    listing may answer (s3fs caches listings per instance unless told not to)."""
    from mmfuse.storage import filesystem

    fs, root = filesystem(f"{s3_server['url']}/ds")
    s3fs_client.pipe_file(f"{root}/shard-000000_stats.json", b"{}")
    assert fs.glob(f"{root}/*.json") == [f"{root}/shard-000000_stats.json"]
    s3fs_client.pipe_file(f"{root}/shard-000001_stats.json", b"{}")  # written elsewhere after the listing
    assert fs.exists(f"{root}/shard-000001_stats.json")
    assert len(fs.glob(f"{root}/*.json")) == 2
    assert fs.client_kwargs["endpoint_url"] == s3_server["endpoint"]  # from AWS_ENDPOINT_URL, not a config key


def test_shard_to_missing_bucket_is_refused_without_creating_it(raw, s3_server, s3fs_client):
    missing = f"{s3_server['bucket']}-typo"
    with pytest.raises(ValueError, match=f"output.path: cannot write to s3://{missing}/ds: .*bucket does not exist"):
        shard.run(_config(str(raw / "manifest.parquet"), f"s3://{missing}/ds"))
    assert not s3fs_client.exists(missing)
