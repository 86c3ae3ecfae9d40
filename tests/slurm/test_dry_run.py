"""``--dry-run`` prints the sbatch script it would submit (a golden file) and submits nothing; bad configs stop
``mmfuse submit`` before any sbatch call."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mmfuse.cli import main as cli
from mmfuse.config import load_config
from pretrain.config import PRESETS, PretrainConfig

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]
GOLDEN = Path(__file__).parent / "golden" / "pretrain_example_gpu.sbatch"


def dry_run(capsys, *args):
    capsys.readouterr()
    code = cli(["submit", *args, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def sections(text: str) -> dict[str, str]:
    """The dry run's parts, keyed by their '# ... (' header: sbatch script, slurm config, stage config."""
    parts, name = {}, None
    for line in text.splitlines():
        header = re.match(r"^# (sbatch script|slurm config|pretrain config) \(", line)
        if header:
            name = header.group(1)
            parts[name] = []
        elif name:
            parts[name].append(line)
    return {key: "\n".join(lines) + "\n" for key, lines in parts.items()}


def test_dry_run_prints_the_golden_sbatch_script_and_submits_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    out = dry_run(capsys, "pretrain", "--config", "configs/pretrain/tiny.yaml", "--slurm", "configs/slurm/example-gpu.yaml",
                  "data.train=s3://bucket/shapes", f"run.dir={run}", "slurm.account=vision", "slurm.time=2-00:00:00")
    parts = sections(out)
    script = parts["sbatch script"].replace(str(run), "{RUN}").replace(sys.executable, "{PYTHON}")
    if os.environ.get("MMFUSE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert "4 node(s) x 8 task(s) = 32 ranks" in out
    # The printed configs are the resolved ones: they load back to the same values.
    pretrain_yaml = tmp_path / "pretrain.yaml"
    pretrain_yaml.write_text(parts["pretrain config"])
    cfg = load_config(PretrainConfig, [str(pretrain_yaml)], presets=PRESETS)
    assert cfg.run.dir == str(run) and cfg.model.flavor == "tiny" and cfg.engine.zero_stage == 2
    assert "account: vision" in parts["slurm config"] and "time: 2-00:00:00" in parts["slurm config"]
    assert not run.exists()  # nothing written, nothing submitted


def test_dry_run_of_a_shard_array_plans_the_slices(tmp_path, capsys):
    assert cli(["synth", f"output.path={tmp_path}/raw", "num_samples=25", "image_size=32", "seed=1"]) == 0
    out = dry_run(capsys, "shard", f"input.path={tmp_path}/raw/manifest.parquet", f"output.path={tmp_path}/shards",
                  "output.samples_per_shard=5", "--slurm", "configs/slurm/local.yaml", "slurm.tasks_per_node=1",
                  "slurm.array_size=2", f"slurm.folder={tmp_path}/job")
    assert "5 of 5 shards to write, over 2 array task(s) of 2-3 shards" in out
    assert "#SBATCH --array=0-1%2" in out
    assert not (tmp_path / "shards").exists() and not (tmp_path / "job").exists()


def next_job_id() -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", out).group(1)


@pytest.mark.parametrize("args, code, message", [
    (["slurm.time=ten"], 2, "slurm.time='ten'"),
    (["slurm.nodes=0"], 2, "slurm.nodes must be at least 1"),
    (["slurm.setup=['export HF_TOKEN=hf_abc']"], 2, "HF_TOKEN"),
    (["slurm.array_size=4"], 2, "job arrays are for shard and curate"),
    (["slurm.partition=nosuch"], 1, "slurm.partition='nosuch': no such partition (known: local)"),
    (["slurm.nodes=3"], 1, "partition 'local' has 1 node(s)"),
    (["slurm.gpu_per_node=1"], 2, "unknown config key 'gpu_per_node'"),
    (["engine.zero_stage=5"], 2, "engine.zero_stage"),
    (["run.resume=none"], 2, "run.resume='none' with slurm.max_requeue=3"),
    (["--slurm", "configs/slurm/nosuch.yaml"], 2, "config file not found: configs/slurm/nosuch.yaml"),
])
def test_bad_config_fails_before_any_sbatch_call(slurm_cluster, tmp_path, capsys, args, code, message):
    before = next_job_id()
    capsys.readouterr()
    result = cli(["submit", "pretrain", "--config", "configs/pretrain/tiny.yaml", "--slurm", "configs/slurm/local.yaml",
                  "data.train=/nowhere", f"run.dir={tmp_path}/run", *args])
    assert result == code
    assert message in capsys.readouterr().err
    assert next_job_id() == before  # the controller saw no submission
    assert not (tmp_path / "run").exists()


def test_unknown_stage_names_the_submittable_ones(capsys):
    assert cli(["submit", "frobnicate"]) == 2
    assert "submittable: pretrain, shard, curate" in capsys.readouterr().err


def test_what_only_sbatch_can_refuse_is_a_clear_error(slurm_cluster, tiny_shards, tmp_path, capsys):
    capsys.readouterr()  # real shards: a missing one would be refused before sbatch is asked
    assert cli(["submit", "pretrain", "--config", "configs/pretrain/tiny.yaml", "--slurm", "configs/slurm/local.yaml",
                f"data.train={tiny_shards}", f"run.dir={tmp_path}/run", "slurm.mem=999999G"]) == 1
    err = capsys.readouterr().err
    assert "mmfuse submit: error: sbatch refused the job:" in err and "Memory specification can not be satisfied" in err
    assert not (tmp_path / "run" / "slurm" / "jobs.jsonl").exists()  # no job on record
