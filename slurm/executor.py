"""SlurmConfig → a submitit executor, and the sbatch script it submits (for ``--dry-run``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import submitit

from slurm.config import SlurmConfig


def sbatch_parameters(cfg: SlurmConfig, job_name: str, array_tasks: int = 1) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters: one task per GPU, each task's stderr in its log, requeueable."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": cfg.time_minutes(),
        "nodes": cfg.nodes,
        "ntasks_per_node": cfg.ntasks_per_node(),
        "cpus_per_task": cfg.cpus_per_task,
        "signal_delay_s": cfg.signal_delay_s,
        "stderr_to_stdout": True,
        "wckey": None,  # submitit's default ("submitit") would be rejected where wckeys are enforced; extra.wckey sets one
        # --requeue: scontrol requeue must work even where the cluster's default is JobRequeue=0.
        "additional_parameters": {"requeue": True, **{k: (v if v != "" else True) for k, v in cfg.extra.items()}},
    }
    if cfg.setup:
        params["setup"] = list(cfg.setup)
    for name in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(cfg, name):
            params[name] = getattr(cfg, name)
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.exclusive:
        params["exclusive"] = True
    if array_tasks > 1:
        params["array_parallelism"] = min(cfg.array_parallelism or array_tasks, array_tasks)
    return params


def python_command(cfg: SlurmConfig) -> str:
    return cfg.python or shlex.quote(sys.executable)


def build_executor(cfg: SlurmConfig, folder: Path, job_name: str, array_tasks: int = 1) -> submitit.Executor:
    if cfg.executor == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeue, python=cfg.python or None)
        executor.update_parameters(timeout_min=cfg.time_minutes(), tasks_per_node=cfg.ntasks_per_node(),
                                   gpus_per_node=cfg.gpus_per_node, signal_delay_s=cfg.signal_delay_s,
                                   stderr_to_stdout=True, setup=list(cfg.setup))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeue, python=cfg.python or None)
    executor.update_parameters(**sbatch_parameters(cfg, job_name, array_tasks))
    return executor


def sbatch_script(cfg: SlurmConfig, folder: Path, job_name: str, array_tasks: int = 1) -> str:
    """The script ``build_executor(...).submit`` hands to sbatch (``map_array`` for ``array_tasks``), rendered
    without a cluster: submitit's own template with the same parameters."""
    from submitit.slurm.slurm import _make_sbatch_string  # the template SlurmExecutor itself fills

    command = " ".join([python_command(cfg), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = sbatch_parameters(cfg, job_name, array_tasks)
    if array_tasks > 1:
        params["map_count"] = array_tasks
    return _make_sbatch_string(command=command, folder=folder, **params)
