"""img2dataset's output folder as it is (NNNNN.tar, NNNNN_stats.json, NNNNN.parquet; no sizes.json): verify checks
it, the preflight and the loader read the folder itself."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import LoaderConfig
from data_pipeline.loader import build_loader
from data_pipeline.preflight import check_dataset
from data_pipeline.loader.sources import resolve_sources
from finetune.records import detect_format
from mmfuse.cli import main as cli
from mmfuse.config import load_config
from tests.loaderdata import sample, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]
COUNTS = [7, 5]


@pytest.fixture
def img2dataset_folder(tmp_path):
    """Two shards the way img2dataset writes them: 9-digit keys, its stats fields, a parquet with a status per row."""
    root = tmp_path / "laion"
    root.mkdir()
    for shard, count in enumerate(COUNTS):
        keys = [f"{shard:05d}{i:04d}" for i in range(count)]
        write_tar(root / f"{shard:05d}.tar", [sample(key, shard * 100 + i) for i, key in enumerate(keys)])
        stats = {"count": count + 2, "successes": count, "failed_to_download": 2, "failed_to_resize": 0,
                 "status_dict": {"success": count, "HTTP Error 404": 2}}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
        rows = [{"key": key, "status": "success"} for key in keys] + [{"key": None, "status": "failed_to_download"}] * 2
        pq.write_table(pa.Table.from_pylist(rows), root / f"{shard:05d}.parquet")
    return root


def test_verify_checks_an_img2dataset_folder_against_its_stats(img2dataset_folder, capsys):
    assert cli(["verify", str(img2dataset_folder)]) == 0
    assert f"(img2dataset layout): 2 shards, {sum(COUNTS)} samples: OK" in capsys.readouterr().out
    stats = img2dataset_folder / "00001_stats.json"
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "successes": 6}))
    assert cli(["verify", str(img2dataset_folder)]) == 1
    assert "00001.tar: 5 samples, its stats say 6" in capsys.readouterr().err


def test_the_loader_and_the_preflight_take_the_folder_itself(img2dataset_folder):
    assert [(url.rsplit("/", 1)[-1], count) for url, count in check_dataset("data.train", str(img2dataset_folder))] == \
        [("00000.tar", 7), ("00001.tar", 5)]
    (img2dataset_folder / "00001_stats.json").unlink()  # a shard without stats is counted from its tar
    assert [s.count for s in resolve_sources(str(img2dataset_folder))[0].shards] == COUNTS
    cfg = load_config(LoaderConfig, [], [f"train={img2dataset_folder}", "batch_size=4", "workers=1", "shuffle_window=4"])
    keys = [key for batch in build_loader(cfg) for key in batch["__key__"]]
    assert sorted(keys) == sorted(f"{shard:05d}{i:04d}" for shard, count in enumerate(COUNTS) for i in range(count))


def test_fine_tuning_reads_the_folder_as_shards(img2dataset_folder):
    assert detect_format(str(img2dataset_folder), "auto") == "shards"


def test_our_own_shards_without_sizes_json_are_an_unfinished_run_not_a_dataset(img2dataset_folder, capsys):
    for stats in img2dataset_folder.glob("*_stats.json"):
        written = json.loads(stats.read_text())["successes"]
        stats.write_text(json.dumps({"written": written, "failed": {}}))  # what mmfuse shard writes per shard
    with pytest.raises(ValueError, match="the sharding run did not finish"):
        resolve_sources(str(img2dataset_folder))
    assert cli(["verify", str(img2dataset_folder)]) == 1
    assert "the sharding run did not finish" in capsys.readouterr().err
