"""The demo path through the real CLI: synth → shard → verify, as `make demo` runs it."""

import json

import pyarrow.parquet as pq
import pytest

from mmfuse.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_synth_shard_verify(tmp_path, capsys):
    raw, shards = tmp_path / "raw", tmp_path / "shards"
    assert main(["synth", f"output.path={raw}", "num_samples=40", "seed=3", "image_size=96"]) == 0
    assert main(["shard", f"input.path={raw}/manifest.parquet", f"output.path={shards}", "output.samples_per_shard=16",
                 "image.size=64", "progress=false"]) == 0
    assert main(["verify", str(shards)]) == 0

    dataset = json.loads((shards / "dataset.json").read_text())
    assert dataset["written"] == 40 and dataset["failed"] == {}
    assert dataset["modalities"] == ["audio", "image", "text"]
    assert json.loads((shards / "sizes.json").read_text()) == {
        "shard-000000.tar": 16, "shard-000001.tar": 16, "shard-000002.tar": 8}
    # Task fields pass through into every sample's json.
    import webdataset as wds
    sample = next(iter(wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False)))
    meta = json.loads(sample["json"])
    manifest = pq.read_table(raw / "manifest.parquet").to_pylist()[0]
    for name in ("label", "label_name", "question", "answers", "captions", "question_id"):
        assert meta[name] == manifest[name]
    assert sample["txt"].decode() == manifest["text"]
    assert {"jpg", "txt", "flac", "json"} <= set(sample)


def test_bad_usage_exits_non_zero_with_message(tmp_path, capsys):
    assert main(["shard", f"output.path={tmp_path}", "input.path=/does/not/exist.parquet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["shard", "input.path=x", "output.path=y", "nonsense.key=1"]) == 2
    assert "nonsense.key" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
