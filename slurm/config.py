"""Typed config of ``mmfuse submit``: where and how a stage runs (``configs/slurm/*.yaml``, ``slurm.key=value``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmfuse.schema import ConfigError

EXECUTORS = ("slurm", "local")
# Directives the launcher writes itself; setting them through `extra` would contradict the typed fields.
MANAGED_DIRECTIVES = frozenset({
    "job-name", "partition", "time", "nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node", "mem", "qos",
    "account", "constraint", "exclusive", "output", "error", "open-mode", "signal", "array", "requeue",
})
# NAME=value where NAME looks like a secret (AWS_SECRET_ACCESS_KEY=..., HF_TOKEN=...).
_SECRET = re.compile(r"\b\w*(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY)\w*\s*=", re.IGNORECASE)
_MEM = re.compile(r"^\d+[KMGT]?$")
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


@dataclass
class SlurmConfig:
    """Where and how ``mmfuse submit`` runs a stage: a SLURM allocation (or this machine) and its requeue policy."""

    executor: str = "slurm"
    """slurm (sbatch through submitit) or local (submitit's local executor: the same callable, no cluster)."""
    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node (0 on CPU-only clusters)."""
    tasks_per_node: int = 0
    """Processes per node, one per GPU (0: gpus_per_node, or 1 without GPUs). Every task is one training rank."""
    cpus_per_task: int = 1
    """CPU cores per task: the rank itself plus its data-loader workers (data.workers + 1 or more)."""
    mem: str = ""
    """Memory per node in sbatch syntax (64G, 500000M; 0 = all of the node's memory; empty: cluster default)."""
    time: str = "01:00:00"
    """Time limit per job: minutes, HH:MM:SS or D-HH:MM:SS. A preempted or timed-out job is requeued with a fresh
    limit (up to max_requeue times)."""
    account: str = ""
    """Account to charge (sbatch --account)."""
    qos: str = ""
    """Quality of service (sbatch --qos)."""
    constraint: str = ""
    """Node features required (sbatch --constraint, e.g. a100)."""
    exclusive: bool = False
    """Whole nodes for this job only (sbatch --exclusive)."""
    job_name: str = ""
    """Job name (empty: mmfuse-<stage>)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Other sbatch directives, name without dashes: {mail-type: END, reservation: big}. An empty value writes a
    bare flag. Directives the typed fields manage (time, nodes, ...) are refused here."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (module load ..., source env.sh). Never put
    secrets here: they would be written into the sbatch script; export them in the submitting shell instead
    (sbatch passes the environment on)."""
    max_requeue: int = 3
    """Times a job may requeue itself after a preemption or time-limit signal (every requeue counts, also those
    SLURM makes). Past that the job fails; submitting the same command again resumes it."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM signals the job to checkpoint and requeue. SLURM may send it
    up to a minute early."""
    array_size: int = 0
    """Job arrays (mmfuse submit shard): array tasks sharing the shards (0: one task). Each task writes a
    contiguous slice of the shards."""
    array_parallelism: int = 0
    """Most array tasks running at once (0: no limit)."""
    folder: str = ""
    """Where the job's files go (submitit pickles, sbatch script, one log per task, resolved configs). Empty: the
    stage's run folder (RUN/slurm for pretrain; for shard, runs/shard/<output name>). Must be on a file system
    the nodes share."""
    python: str = ""
    """Command that runs Python on the nodes (empty: this interpreter; the environment must be on a shared file
    system)."""

    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    def time_minutes(self) -> int:
        return parse_time(self.time)

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"slurm.executor must be one of {EXECUTORS}, got {self.executor!r}")
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slurm.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "tasks_per_node", "max_requeue", "signal_delay_s", "array_size", "array_parallelism"):
            if getattr(self, name) < 0:
                raise ConfigError(f"slurm.{name} must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node not in (0, self.gpus_per_node):
            raise ConfigError(f"slurm.tasks_per_node={self.tasks_per_node} with slurm.gpus_per_node={self.gpus_per_node}: "
                              "one task per GPU (set tasks_per_node=0 or equal to gpus_per_node)")
        if self.executor == "local" and self.nodes != 1:
            raise ConfigError(f"slurm.executor=local runs on this machine only: slurm.nodes must be 1, got {self.nodes}")
        if self.mem and not _MEM.match(self.mem):
            raise ConfigError(f"slurm.mem={self.mem!r}: expected a number with an optional K/M/G/T suffix (64G)")
        minutes = self.time_minutes()
        if self.signal_delay_s >= minutes * 60:
            raise ConfigError(f"slurm.signal_delay_s={self.signal_delay_s} must be shorter than slurm.time={self.time!r}")
        for key, value in self.extra.items():
            if not re.match(r"^[a-z][a-z0-9-]*$", key):
                raise ConfigError(f"slurm.extra key {key!r}: expected an sbatch option name without dashes (mail-type)")
            if key in MANAGED_DIRECTIVES:
                raise ConfigError(f"slurm.extra.{key}: the launcher writes this directive from the typed fields "
                                  "(partition, time, nodes, ...); set those instead")
            if _SECRET.search(str(value)):
                raise ConfigError(f"slurm.extra.{key} looks like a secret; it would be written into the sbatch script")
        for number, line in enumerate(self.setup):
            if _SECRET.search(line):
                raise ConfigError(f"slurm.setup[{number}] looks like it sets a secret ({_SECRET.search(line).group(0).rstrip('= ')!r}); "
                                  "it would be written into the sbatch script: export it in the submitting shell instead")


def parse_time(value: str) -> int:
    """sbatch time syntax → whole minutes (rounded up): ``90``, ``1:30:00``, ``2-00:00:00``."""
    match = _TIME.match(str(value).strip())
    if not match:
        raise ConfigError(f"slurm.time={value!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days = int(match["days"] or 0)
    parts = [int(p) for p in (match["a"], match["b"], match["c"]) if p is not None]
    if len(parts) == 1:
        seconds = parts[0] * 60 if not match["days"] else parts[0] * 3600
    elif len(parts) == 2:
        seconds = parts[0] * 3600 + parts[1] * 60 if match["days"] else parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    seconds += days * 86400
    if seconds <= 0:
        raise ConfigError(f"slurm.time={value!r} must be positive")
    return -(-seconds // 60)
