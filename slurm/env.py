"""SLURM's (or submitit's local executor's) task environment → the standard torch launch variables.

Stages know only RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; this is the one
place that reads SLURM's variables. Pure functions of an environment mapping, so they are testable anywhere.
"""

from __future__ import annotations

import re
from typing import Mapping

PORT_BASE, PORT_SPAN = 10000, 20000  # below Linux's ephemeral range (32768+), so no client socket holds it


def expand_nodelist(nodelist: str) -> list[str]:
    """``gpu[01-03,7],login1`` → ``[gpu01, gpu02, gpu03, gpu7, login1]`` (SLURM's hostlist syntax, zero padding
    kept; several bracket groups in one name are expanded left to right)."""
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            if not literal and not ranges:
                continue
            names = [name + literal for name in names]
            if ranges:
                names = [name + suffix for name in names for suffix in _expand_ranges(ranges, nodelist)]
        hosts += names
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    groups, depth, current = [], 0, ""
    for char in nodelist:
        if char == "," and depth == 0:
            groups.append(current)
            current = ""
            continue
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
        current += char
    if depth:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    return [g for g in groups + [current] if g]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
        out += [f"{n:0{len(low)}d}" for n in range(int(low), int(high or low) + 1)]
    return out


def tasks_on_node(tasks_per_node: str, node_index: int) -> int:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) → the task count of node ``node_index``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node_index]


def master_port(job_id: str) -> int:
    """A port derived from the job id: every task computes the same one, and two jobs sharing a node differ
    (unless their ids are PORT_SPAN apart)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def torch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch launch variables for this task, from SLURM's variables or submitit's local executor's."""
    if "SLURM_PROCID" in environ:
        nodes = expand_nodelist(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
        node_index = int(environ.get("SLURM_NODEID", "0"))
        per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
        rank, world_size = environ["SLURM_PROCID"], environ["SLURM_NTASKS"]
        local_rank, local_world_size = environ["SLURM_LOCALID"], str(tasks_on_node(per_node, node_index))
        master, job_id = nodes[0], environ["SLURM_JOB_ID"]
    elif "SUBMITIT_LOCAL_GLOBALID" in environ:
        rank = local_rank = environ["SUBMITIT_LOCAL_GLOBALID"]
        world_size = local_world_size = environ["SUBMITIT_LOCAL_NTASKS"]
        master, job_id = "127.0.0.1", environ["SUBMITIT_LOCAL_JOB_ID"]
    else:
        raise RuntimeError("not inside a SLURM task or a submitit local job (no SLURM_PROCID, no SUBMITIT_LOCAL_GLOBALID)")
    env = {"RANK": rank, "WORLD_SIZE": world_size, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world_size,
           "MASTER_ADDR": master, "MASTER_PORT": str(master_port(job_id))}
    # Like torchrun: one thread per rank unless told otherwise; under SLURM, the cores the task was given.
    if "OMP_NUM_THREADS" not in environ:
        env["OMP_NUM_THREADS"] = environ.get("SLURM_CPUS_PER_TASK", "1")
    return env
