"""``mmfuse submit shard``: a job array (and the local executor) writes the same shards as a local run."""

import json
from pathlib import Path

import pytest

from data_pipeline.config import ShardConfig
from data_pipeline.shard.readers import _cached_rows
from mmfuse.cli import main as cli
from mmfuse.config import load_config
from slurm.jobs import job_states
from slurm.shard_array import ShardSlice, plan_array

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(600)]
SHARD = ["--config", "configs/data/shapes.yaml", "output.samples_per_shard=10", "image.size=64", "progress=false"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("array-data")
    assert cli(["synth", f"output.path={root}/raw", "num_samples=60", "image_size=64", "seed=11"]) == 0
    return root / "raw" / "manifest.parquet"


@pytest.fixture(scope="module")
def reference(raw, tmp_path_factory):
    """The same input sharded by ``mmfuse shard`` on this machine."""
    out = tmp_path_factory.mktemp("array-reference") / "shards"
    assert cli(["shard", *SHARD, f"input.path={raw}", f"output.path={out}", "processes=1"]) == 0
    return out


def assert_same_dataset(ours: Path, reference: Path) -> None:
    tars = sorted(p.name for p in reference.glob("*.tar"))
    assert len(tars) == 6 and sorted(p.name for p in ours.glob("*.tar")) == tars
    for name in tars:
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name
    assert (ours / "sizes.json").read_bytes() == (reference / "sizes.json").read_bytes()
    mine, theirs = json.loads((ours / "dataset.json").read_text()), json.loads((reference / "dataset.json").read_text())
    for key in ("shards", "input_rows", "written", "failed", "bytes", "modalities", "member_bytes"):
        assert mine[key] == theirs[key], key


def test_job_array_shards_equal_a_local_run(slurm_cluster, raw, reference, tmp_path, capsys):
    out = tmp_path / "shards"
    command = ["submit", "shard", *SHARD, f"input.path={raw}", f"output.path={out}", "processes=1",
               "--slurm", "configs/slurm/local.yaml", "slurm.tasks_per_node=1", "slurm.array_size=3",
               "slurm.array_parallelism=2", f"slurm.folder={tmp_path}/job"]
    capsys.readouterr()
    assert cli([*command, "--follow"]) == 0  # returns once every array task has COMPLETED
    followed = capsys.readouterr()
    job_id = followed.out.split("submitted job ", 1)[1].split(":")[0]
    assert "of this task's 2 shards to write" in followed.out  # array task 0's log, streamed
    assert f"job {job_id} ended: COMPLETED" in followed.err
    script = (tmp_path / "job" / "jobs" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script
    assert job_states(job_id) == ["COMPLETED"] * 3
    assert_same_dataset(out, reference)
    logs = {p.name: p.read_text() for p in (tmp_path / "job" / "jobs").glob(f"{job_id}_*_0_log.out")}
    assert len(logs) == 3 and all("2 of this task's 2 shards to write" in text for text in logs.values())
    assert sum("wrote sizes.json and dataset.json" in text for text in logs.values()) >= 1

    # Submitting again finds every shard written: no job, the totals are (re)written from the stats files.
    (out / "sizes.json").unlink()
    assert cli(command) == 0
    assert "every shard is already written" in capsys.readouterr().err
    assert (out / "sizes.json").read_bytes() == (reference / "sizes.json").read_bytes()


def test_local_executor_shards_equal_a_local_run(raw, reference, tmp_path, capsys):
    out = tmp_path / "shards"
    capsys.readouterr()
    assert cli(["submit", "shard", *SHARD, f"input.path={raw}", f"output.path={out}", "processes=1",
                "--slurm", "configs/slurm/local-executor.yaml", "slurm.tasks_per_node=1", "slurm.array_size=2",
                f"slurm.folder={tmp_path}/job", "--follow"]) == 0
    assert "submitted job" in capsys.readouterr().out
    assert_same_dataset(out, reference)


def test_totals_are_written_only_when_every_shard_is_done(raw, reference, tmp_path):
    _cached_rows.cache_clear()
    cfg = load_config(ShardConfig, ["configs/data/shapes.yaml"], [f"input.path={raw}", f"output.path={tmp_path}/out",
                      "output.samples_per_shard=10", "image.size=64", "progress=false", "processes=1"])
    tasks, todo, fingerprint = plan_array(cfg)
    assert len(tasks) == len(todo) == 6
    last, first = ShardSlice(cfg, fingerprint, todo[3:], 6), ShardSlice(cfg, fingerprint, todo[:3], 6)
    assert last()["finalized"] is False  # shards 3-5 written, 0-2 not yet: no totals
    assert not (tmp_path / "out" / "sizes.json").exists() and not (tmp_path / "out" / "dataset.json").exists()
    assert first()["finalized"] is True
    assert_same_dataset(tmp_path / "out", reference)
    # A rerun of a finished slice (a requeued array task) writes nothing again.
    assert ShardSlice(cfg, fingerprint, todo[:3], 6)()["shards"] == 0
