"""``mmfuse submit curate``: the curation stage as one SLURM job decides exactly what a local run decides."""

import json

import pyarrow.parquet as pq
import pytest

from mmfuse.cli import main as cli
from slurm.jobs import job_states

pytestmark = [pytest.mark.slurm, pytest.mark.integration, pytest.mark.timeout(300)]
CURATE = ["--config", "configs/curate/default.yaml", "processes=1", "progress=false"]


def test_a_curate_job_writes_the_index_a_local_run_writes(slurm_cluster, tiny_shards, tmp_path, capsys):
    local, submitted = tmp_path / "local", tmp_path / "submitted"
    assert cli(["curate", *CURATE, f"input.path={tiny_shards}", f"output.path={local}"]) == 0
    capsys.readouterr()
    assert cli(["submit", "curate", *CURATE, f"input.path={tiny_shards}", f"output.path={submitted}",
                "--slurm", "configs/slurm/local.yaml", "slurm.tasks_per_node=1", f"slurm.folder={tmp_path}/job",
                "--follow"]) == 0
    followed = capsys.readouterr()
    job_id = followed.out.split("submitted job ", 1)[1].split(":")[0]
    assert job_states(job_id) == ["COMPLETED"]
    assert pq.read_table(submitted / "index.parquet").equals(pq.read_table(local / "index.parquet"))
    summary = json.loads((submitted / "curate.json").read_text())
    assert summary["samples"] == 64 and summary == json.loads((local / "curate.json").read_text())
