"""``mmfuse submit curate``: the curation stage as a SLURM job array decides exactly what a local run decides."""

import json

import pyarrow.parquet as pq
import pytest

from data_pipeline.curate.config import CurateConfig
from mmfuse.cli import main as cli
from mmfuse.config import load_config
from slurm.curate_array import CurateSlice, plan
from slurm.jobs import job_states

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(300)]
CURATE = ["--config", "configs/curate/default.yaml", "processes=1", "progress=false"]


@pytest.fixture(scope="module")
def local(tiny_shards, tmp_path_factory):
    """The index of ``mmfuse curate`` run on this machine."""
    out = tmp_path_factory.mktemp("curate-local") / "out"
    assert cli(["curate", *CURATE, f"input.path={tiny_shards}", f"output.path={out}"]) == 0
    return out


def assert_same_decisions(ours, reference):
    assert pq.read_table(ours / "index.parquet").equals(pq.read_table(reference / "index.parquet"))
    summary = json.loads((ours / "curate.json").read_text())
    assert summary["samples"] == 64 and summary == json.loads((reference / "curate.json").read_text())


def test_a_curate_job_array_writes_the_index_a_local_run_writes(slurm_cluster, tiny_shards, local, tmp_path, capsys):
    submitted = tmp_path / "submitted"
    command = ["submit", "curate", *CURATE, f"input.path={tiny_shards}", f"output.path={submitted}",
               "--slurm", "configs/slurm/local.yaml", "slurm.tasks_per_node=1", "slurm.array_size=2",
               f"slurm.folder={tmp_path}/job"]
    capsys.readouterr()
    assert cli([*command, "--follow"]) == 0  # returns once every array task has COMPLETED
    followed = capsys.readouterr()
    assert "4 of 4 shards to scan, over 2 array task(s) of 2-2 shards" in followed.out
    job_id = followed.out.split("submitted job ", 1)[1].split(":")[0]
    assert job_states(job_id) == ["COMPLETED", "COMPLETED"]
    assert_same_decisions(submitted, local)
    # Resubmitted with every shard scanned (here: other rules on the same scans), it decides at once, without a job.
    (submitted / "index.parquet").unlink()
    assert cli([*command, "captions.min_words=3"]) == 0
    assert "every shard is already scanned; decided from the scans" in capsys.readouterr().err
    assert pq.read_table(submitted / "index.parquet").num_rows == 64


def test_the_task_that_finds_every_shard_scanned_decides(tiny_shards, local, tmp_path):
    cfg = load_config(CurateConfig, ["configs/curate/default.yaml"], [f"input.path={tiny_shards}",
                      f"output.path={tmp_path}/out", "processes=1", "progress=false"])
    slices, _ = plan(cfg, 2)
    first, last = (part.mine for part in slices)
    assert [len(first), len(last)] == [2, 2]
    assert CurateSlice(cfg, last, first + last)()["decided"] is False  # shards 2-3 scanned, 0-1 not yet
    assert not (tmp_path / "out" / "index.parquet").exists()
    assert CurateSlice(cfg, first, first + last)() == {"shards": 2, "decided": True}
    assert_same_decisions(tmp_path / "out", local)
    # A requeued task whose scans are written scans nothing again, and decides the same.
    assert CurateSlice(cfg, first, first + last)() == {"shards": 0, "decided": True}
    assert_same_decisions(tmp_path / "out", local)
