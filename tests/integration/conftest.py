"""Fixtures the integration tests share across modules (one copy per test session, per xdist worker)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfuse.cli import main as cli


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """96 synthetic samples (a third without audio) in 4 shards of 64 px images: the pre-training tests' data."""
    root = tmp_path_factory.mktemp("pretrain-data")
    assert cli(["synth", f"output.path={root}/raw", "num_samples=96", "image_size=64", "seed=5"]) == 0
    # Drop the audio of every third sample: training must cope with missing modalities.
    table = pq.read_table(root / "raw" / "manifest.parquet").to_pylist()
    for i, row in enumerate(table):
        if i % 3 == 0:
            row["audio"] = None
    pq.write_table(pa.Table.from_pylist(table), root / "raw" / "partial.parquet")
    assert cli(["shard", f"input.path={root}/raw/partial.parquet", f"output.path={root}/shards",
                "output.samples_per_shard=24", "image.size=64", "image.resize_mode=center_crop", "progress=false"]) == 0
    return root / "shards"
