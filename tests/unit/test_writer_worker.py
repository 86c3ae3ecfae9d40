import json
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from data_pipeline.config import OutputConfig, ShardConfig
from data_pipeline.errors import SampleError
from data_pipeline.shard.worker import _json_fields, config_fingerprint, ordered_map
from data_pipeline.shard.writer import ShardWriter, sample_key
from mmfuse.config import load_config


def stats():
    return {"shard": "s", "written": 0, "failed": {}, "bytes": {"members": {}}}


def test_writer_commits_tar_parquet_then_stats(tmp_path):
    writer = ShardWriter(OutputConfig(path=str(tmp_path), prefix="x"), 3)
    writer.write({"__key__": "0000030000", "jpg": b"\xff\xd8jpeg", "txt": b"hello", "json": b"{}"})
    writer.record({"key": "0000030000", "status": "success", "tags": ["a", "b"], "n": 1})
    writer.record({"key": "0000030001", "status": "failed", "tags": None, "n": "mixed"})
    # Nothing is visible before close.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    writer.close(stats())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-000003.parquet", "x-000003.tar", "x-000003_stats.json"]
    with tarfile.open(tmp_path / "x-000003.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["0000030000.jpg", "0000030000.txt", "0000030000.json"]
        assert {(m.mtime, m.mode, m.uname) for m in members} == {(0, 0o444, "mmfuse")}
        assert tar.extractfile(members[1]).read() == b"hello"
    table = pq.read_table(tmp_path / "x-000003.parquet").to_pylist()
    assert table[0]["tags"] == '["a", "b"]' and table[1]["n"] == '"mixed"'  # odd columns become JSON text
    assert json.loads((tmp_path / "x-000003_stats.json").read_text())["bytes"]["tar"] > 0


def test_writer_abort_leaves_nothing(tmp_path):
    writer = ShardWriter(OutputConfig(path=str(tmp_path)), 0)
    writer.write({"__key__": "k", "txt": b"x"})
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_removes_its_own_stale_temp_files_only(tmp_path):
    (tmp_path / ".shard-000000.tar.tmp-999").write_bytes(b"partial")
    (tmp_path / ".shard-000000_stats.json.tmp-999").write_bytes(b"{")
    (tmp_path / ".shard-000001.tar.tmp-999").write_bytes(b"another run's")
    ShardWriter(OutputConfig(path=str(tmp_path)), 0).abort()
    assert [p.name for p in tmp_path.iterdir()] == [".shard-000001.tar.tmp-999"]


def test_sample_key_is_shard_then_padded_index():
    assert sample_key(12, 7, 1000) == "0000120007"
    assert sample_key(1, 5, 100000) == "00000100005"


def test_ordered_map_keeps_order_and_bounds_in_flight():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (i % 3))
        with lock:
            in_flight -= 1
        return i * i

    with ThreadPoolExecutor(8) as pool:
        assert list(ordered_map(pool, work, range(50), window=4)) == [i * i for i in range(50)]
    assert peak <= 4


def test_fingerprint_ignores_runtime_settings_only():
    base = ["input.path=x", "output.path=y"]
    fp = config_fingerprint(load_config(ShardConfig, [], base))
    assert fp == config_fingerprint(load_config(ShardConfig, [], base + ["processes=7", "fetch.threads=2", "progress=false"]))
    assert fp != config_fingerprint(load_config(ShardConfig, [], base + ["image.size=128"]))


@pytest.mark.parametrize("data, detail", [(b"[" * 100_000, "RecursionError"), (b"\xff{", "UnicodeDecodeError"),
                                          (b"[1, 2]", "not an object")])
def test_folder_json_that_cannot_pass_through_fails_the_sample_as_bad_json(data, detail):
    with pytest.raises(SampleError) as err:
        _json_fields(data)
    assert err.value.reason == "bad_json" and err.value.detail.startswith(detail)
