"""The launcher's pure parts: SLURM → torch variables, node lists, time limits, config validation, array split."""

import shutil
import subprocess

import pytest

from mmfuse.config import ConfigError, load_config
from slurm.config import SlurmConfig, parse_time
from slurm.env import expand_nodelist, master_port, tasks_on_node, torch_env
from slurm.shard_array import split

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(60)]

NODELISTS = ["node1", "node[1-2]", "gpu[001-003,017],login1", "a[1-2]b[08-09]", "n1,n2,n[3-4]"]


@pytest.mark.parametrize("nodelist", NODELISTS)
def test_nodelist_expands_like_scontrol(nodelist):
    expected = {
        "node1": ["node1"],
        "node[1-2]": ["node1", "node2"],
        "gpu[001-003,017],login1": ["gpu001", "gpu002", "gpu003", "gpu017", "login1"],
        "a[1-2]b[08-09]": ["a1b08", "a1b09", "a2b08", "a2b09"],
        "n1,n2,n[3-4]": ["n1", "n2", "n3", "n4"],
    }[nodelist]
    assert expand_nodelist(nodelist) == expected
    if shutil.which("scontrol"):  # SLURM's own parser agrees (it needs no controller for this)
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == expected


def test_bad_nodelist_is_an_error():
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist("node[1-")


def test_slurm_task_variables_become_torch_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
               "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_ID": "123456",
               "SLURM_CPUS_PER_TASK": "10"}
    env = torch_env(environ)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(master_port("123456")), "OMP_NUM_THREADS": "10"}
    # Every task of the job derives the same port; another job another one; always below the ephemeral range.
    assert torch_env({**environ, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]
    assert master_port("123457") != master_port("123456") and 10000 <= master_port("99999999") < 32768
    # The step's node list wins over the job's (a step on part of the allocation); OMP_NUM_THREADS is respected.
    env = torch_env({**environ, "SLURM_STEP_NODELIST": "gpu[09-10]", "OMP_NUM_THREADS": "4"})
    assert env["MASTER_ADDR"] == "gpu09" and "OMP_NUM_THREADS" not in env


def test_uneven_tasks_per_node_and_local_executor():
    assert [tasks_on_node("3(x2),1", i) for i in range(3)] == [3, 3, 1]
    env = torch_env({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "4242"})
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "127.0.0.1")
    with pytest.raises(RuntimeError, match="not inside a SLURM task"):
        torch_env({})


@pytest.mark.parametrize("value, minutes", [("90", 90), ("1:30:00", 90), ("2-00:00:00", 2880), ("0:0:30", 1),
                                            ("1-12", 2160), ("45:30", 46)])
def test_time_limits_in_sbatch_syntax(value, minutes):
    assert parse_time(value) == minutes


@pytest.mark.parametrize("override, message", [
    ("nodes=0", "slurm.nodes must be at least 1"),
    ("time=ten", "slurm.time='ten'"),
    ("time=0", "must be positive"),
    ("mem=64GB", "slurm.mem='64GB'"),
    ("executor=cloud", "slurm.executor must be one of"),
    ("signal_delay_s=7200", "slurm.signal_delay_s=7200 must be shorter"),
    ("gpus_per_node=8", "one task per GPU"),
    ("extra={time: '10'}", "slurm.extra.time"),
    ("extra={--mail: x}", "slurm.extra key '--mail'"),
    ("setup=['export AWS_SECRET_ACCESS_KEY=abc']", "AWS_SECRET_ACCESS_KEY"),
    ("partitionn=gpu", "unknown config key 'partitionn'"),
    ("nodes=two", "nodes"),
])
def test_bad_slurm_config_names_the_key(override, message):
    overrides = [override] + (["tasks_per_node=4"] if override.startswith("gpus") else [])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(SlurmConfig, ["configs/slurm/local.yaml"], overrides)


def test_shipped_slurm_configs_load():
    for name in ("local", "local-executor", "example-gpu"):
        cfg = load_config(SlurmConfig, [f"configs/slurm/{name}.yaml"])
        assert cfg.ntasks_per_node() >= 1
    assert load_config(SlurmConfig, ["configs/slurm/example-gpu.yaml"]).ntasks_per_node() == 8


def test_array_split_is_contiguous_and_balanced():
    parts = split(list(range(10)), 4)
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert split(list(range(3)), 8) == [[0], [1], [2]]  # never an empty array task
    assert sum(split(list(range(1001)), 7), []) == list(range(1001))


STOP_SIGNALS_SCRIPT = r"""
import os, signal, time
from slurm.task import StopSignals

stops = StopSignals()
os.kill(os.getpid(), signal.SIGUSR2)       # the time-limit signal, before the stage installed its handlers: held
time.sleep(0.3)
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append("TERM"))   # the stage's handlers (pretrain: stop at the next step)
signal.signal(signal.SIGUSR1, lambda *a: got.append("USR1"))
deadline = time.time() + 10
while not got and time.time() < deadline:
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGUSR2)       # now handed straight to the stage's SIGUSR1 handler
time.sleep(0.2)
print(got, sorted(stops.close()))
"""


def test_stop_signals_reach_the_stage_even_before_it_is_ready():
    import sys

    out = subprocess.run([sys.executable, "-c", STOP_SIGNALS_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # Both reached the stage as SIGUSR1 (the held one re-sent as such); both are on record for the requeue decision.
    assert out.stdout.strip() == "['USR1', 'USR1'] [10, 12]"


def test_a_job_submitted_before_a_key_was_renamed_reads_it_under_the_new_name():
    import pickle

    from pretrain.config import PRESETS, PretrainConfig
    from slurm.task import StageTask

    cfg = load_config(PretrainConfig, [], ["run.dir=r", "data.train=t", "model.freeze=[image]"], presets=PRESETS)
    task = pickle.loads(pickle.dumps(StageTask("pretrain", cfg, max_requeue=1)))
    task._yaml = task._yaml.replace("freeze:", "lock:")  # as an older release wrote it
    assert "lock:" in task._yaml and task.cfg.model.freeze == ["image"]
