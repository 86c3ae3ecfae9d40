"""``mmfuse submit <stage> [--config FILE]... --slurm configs/slurm/CLUSTER.yaml [key=value]... [slurm.key=value]...
[--dry-run] [--follow]``: run a stage on SLURM (or on this machine with ``slurm.executor=local``).

Every config is resolved and validated here, on the login node, before anything is submitted. The run folder
gets the resolved configs, the command, submitit's job folder and one log per task::

    RUN/slurm/command.sh      the submit command (run it again to resume: a run resumes from its checkpoints)
    RUN/slurm/slurm.yaml      the resolved SLURM settings
    RUN/slurm/<stage>.yaml    the resolved stage config
    RUN/slurm/jobs.jsonl      one line per submission (job id, time)
    RUN/slurm/jobs/           submitit: <job>_submission.sh, <job>_submitted.pkl, <job>_<task>_log.out, results
    RUN/logs/rank<N>.log      (pretrain) a link to each rank's log of the newest job
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmfuse.redact import redact_text
from mmfuse.config import ConfigError, help_text, load_config, to_yaml
from slurm.config import SlurmConfig
from slurm.executor import build_executor, sbatch_script
from slurm.stages import STAGES, Stage

log = logging.getLogger("mmfuse.slurm")
USAGE = ("usage: mmfuse submit <stage> [--config FILE.yaml]... --slurm configs/slurm/CLUSTER.yaml [key=value]... "
         "[slurm.key=value]... [--dry-run] [--follow]")


@dataclass
class Arguments:
    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    slurm_files: list[str] = field(default_factory=list)
    slurm_overrides: list[str] = field(default_factory=list)
    dry_run: bool = False
    follow: bool = False


@dataclass
class Plan:
    """Everything a submission needs, resolved: what runs, where its files go, what sbatch gets."""

    stage: str
    spec: Stage
    cfg: Any
    slurm: SlurmConfig
    run_dir: Path
    folder: Path
    job_name: str
    callables: list = field(default_factory=list)
    summary: str = ""


def parse(argv: list[str]) -> Arguments:
    args, argv = Arguments(), list(argv)
    while argv:
        arg = argv.pop(0)
        if arg in ("--config", "--slurm"):
            if not argv:
                raise ConfigError(f"{arg} needs a YAML file")
            (args.configs if arg == "--config" else args.slurm_files).append(argv.pop(0))
        elif arg.startswith(("--config=", "--slurm=")):
            name, value = arg.split("=", 1)
            (args.configs if name == "--config" else args.slurm_files).append(value)
        elif arg == "--dry-run":
            args.dry_run = True
        elif arg == "--follow":
            args.follow = True
        elif arg.startswith("slurm.") and "=" in arg:
            args.slurm_overrides.append(arg.removeprefix("slurm."))
        elif "=" in arg and not arg.startswith("-"):
            args.overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use key=value, slurm.key=value, --config FILE, --slurm FILE, "
                              "--dry-run, --follow or --help")
    return args


def load(stage: str, args: Arguments) -> Plan:
    """Resolve and validate both configs and the combination; no file is written, nothing is submitted."""
    spec = STAGES[stage]
    schema = spec.load_schema()
    presets = getattr(sys.modules[schema.__module__], "PRESETS", None)
    cfg = load_config(schema, args.configs, args.overrides, presets)
    slurm = load_config(SlurmConfig, args.slurm_files, args.slurm_overrides)
    if slurm.array_size > 1 and not spec.array:
        raise ConfigError(f"slurm.array_size={slurm.array_size}: job arrays are for shard and curate; {stage} runs as one job "
                          "(use slurm.nodes and slurm.tasks_per_node)")
    if spec.array and slurm.nodes * slurm.ntasks_per_node() > 1:
        raise ConfigError(f"{stage} runs one process per array task (with its own worker processes); "
                          "set slurm.array_size instead of slurm.nodes/tasks_per_node")
    if spec.check:
        spec.check(cfg, slurm)
    run_dir = Path(spec.run_dir(cfg)).absolute()
    folder = Path(slurm.folder).absolute() if slurm.folder else run_dir / "slurm"
    return Plan(stage, spec, cfg, slurm, run_dir, folder, slurm.job_name or f"mmfuse-{stage}")


def prepare(plan: Plan, create_output: bool) -> None:
    """The callables to submit: one StageTask, or one callable per array task (the stage's ``array`` module)."""
    if plan.spec.array:
        plan.callables, plan.summary = importlib.import_module(plan.spec.array).plan(
            plan.cfg, plan.slurm.array_size or 1, create_output)
    else:
        from slurm.task import StageTask

        plan.callables = [StageTask(plan.stage, plan.cfg, plan.slurm.max_requeue)]
        slurm = plan.slurm
        plan.summary = f"{slurm.nodes} node(s) x {slurm.ntasks_per_node()} task(s) = {slurm.nodes * slurm.ntasks_per_node()} ranks"


def dry_run(plan: Plan) -> str:
    lines = [f"# mmfuse submit {plan.stage}: dry run, nothing submitted", f"# {plan.summary}", f"# run folder: {plan.run_dir}"]
    if plan.slurm.executor == "local":
        lines.append(f"# local executor: {plan.slurm.ntasks_per_node()} task(s) on this machine, no sbatch script")
    else:
        lines += [f"# sbatch script ({plan.folder / 'jobs'}/<job id>_submission.sh once submitted):",
                  sbatch_script(plan.slurm, plan.folder / "jobs", plan.job_name, len(plan.callables)).rstrip("\n")]
    lines += [f"# slurm config ({plan.folder / 'slurm.yaml'}):", to_yaml(plan.slurm).rstrip("\n"),
              f"# {plan.stage} config ({plan.folder / f'{plan.stage}.yaml'}):", redact_text(to_yaml(plan.cfg)).rstrip("\n")]
    return "\n".join(lines) + "\n"


def preflight(slurm: SlurmConfig) -> None:
    """What can be checked against the cluster before sbatch: the tools, the partition, its size."""
    if slurm.executor == "local":
        return
    if not shutil.which("sbatch"):
        raise ValueError("sbatch not found: submit from a SLURM login node, or run here with slurm.executor=local")
    result = subprocess.run(["sinfo", "-h", "-o", "%R %D"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"sinfo failed, is the SLURM controller reachable? {result.stderr.strip()}")
    nodes: dict[str, int] = {}
    for line in result.stdout.splitlines():
        name, count = line.split()
        nodes[name] = nodes.get(name, 0) + int(count)
    if slurm.partition and slurm.partition not in nodes:
        raise ValueError(f"slurm.partition={slurm.partition!r}: no such partition (known: {', '.join(sorted(nodes))})")
    if slurm.partition and slurm.nodes > nodes[slurm.partition]:
        raise ValueError(f"slurm.nodes={slurm.nodes}: partition {slurm.partition!r} has {nodes[slurm.partition]} node(s)")


def refuse_if_running(plan: Plan) -> None:
    """Two jobs writing one run folder would corrupt it: refuse while an earlier job of this folder is alive."""
    from slurm.jobs import is_active

    history = plan.folder / "jobs.jsonl"
    if not history.exists():
        return
    for line in history.read_text().splitlines():
        entry = json.loads(line)
        alive = is_active(entry["job_id"]) if entry["executor"] == "slurm" else _pid_alive(entry["job_id"])
        if alive:
            raise ValueError(f"job {entry['job_id']} of this run folder ({plan.run_dir}) is still queued or running; "
                             f"wait for it or cancel it (scancel {entry['job_id']}) before submitting again")


def _pid_alive(job_id: str) -> bool:
    try:
        os.kill(int(job_id), 0)
        return True
    except (OSError, ValueError):
        return False


def write_run_files(plan: Plan, argv: list[str]) -> None:
    plan.folder.mkdir(parents=True, exist_ok=True)
    (plan.folder / "slurm.yaml").write_text(to_yaml(plan.slurm))
    (plan.folder / f"{plan.stage}.yaml").write_text(redact_text(to_yaml(plan.cfg)))
    command = shlex.join(["mmfuse", "submit", *argv])
    (plan.folder / "command.sh").write_text(
        f"#!/bin/sh\n# Submitted {time.strftime('%Y-%m-%d %H:%M:%S')}; run again to resume.\n"
        f"cd {shlex.quote(os.getcwd())} && {redact_text(command)}\n")


def submit(plan: Plan) -> list:
    import submitit

    executor = build_executor(plan.slurm, plan.folder / "jobs", plan.job_name, len(plan.callables))
    try:
        if len(plan.callables) == 1:
            jobs = [executor.submit(plan.callables[0])]
        else:
            with executor.batch():
                jobs = [executor.submit(task) for task in plan.callables]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        raise ValueError(f"sbatch refused the job: {err}") from None
    main_id = jobs[0].job_id.split("_")[0]
    with open(plan.folder / "jobs.jsonl", "a") as history:
        history.write(json.dumps({"job_id": main_id, "executor": plan.slurm.executor, "tasks": len(jobs),
                                  "time": time.time()}) + "\n")
    return jobs


def rank0_log(jobs: list) -> Path:
    return Path(jobs[0].paths.stdout)


def follow(plan: Plan, jobs: list) -> int:
    from slurm.jobs import follow as follow_log, job_states

    job_id = jobs[0].job_id.split("_")[0]
    if plan.slurm.executor == "local":
        follow_log(job_id, rank0_log(jobs), done=lambda: all(job.done() for job in jobs))
        # A job stopped by SIGTERM leaves rank 0 no result file; asking submitit for its outcome would wait 15 s per
        # task for one (its grace period for slow shared file systems).
        stopped = [job.job_id for job in jobs if not (job.paths.folder / f"{job.job_id}_0_result.pkl").exists()]
        failed = [job.job_id for job in jobs if job.job_id not in stopped and job.exception() is not None]
        if stopped:
            print(f"mmfuse submit: local job(s) {', '.join(stopped)} stopped before finishing; what they committed is "
                  "kept: submit the same command to go on", file=sys.stderr)
        if failed:
            print(f"mmfuse submit: local job(s) failed: {', '.join(failed)}", file=sys.stderr)
        if not stopped and not failed:
            print("mmfuse submit: local job(s) finished", file=sys.stderr)
        return 1 if failed or stopped else 0
    follow_log(job_id, rank0_log(jobs))
    states = job_states(job_id)
    print(f"mmfuse submit: job {job_id} ended: {', '.join(sorted(set(states))) or 'unknown'}", file=sys.stderr)
    return 0 if states and all(state == "COMPLETED" for state in states) else 1


def usage() -> str:
    keys = help_text(SlurmConfig, "mmfuse submit").split("\n\n", 2)[2]
    keys = re.sub(r"^  (?=\w)", "  slurm.", keys, flags=re.MULTILINE)
    return (f"{USAGE}\n\nstages: {', '.join(STAGES)}; stage keys as in mmfuse <stage> --help.\n\n"
            f"SLURM keys (--slurm FILE.yaml, then slurm.key=value):\n\n{keys}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        raise ConfigError(f"cannot submit stage {stage!r} (submittable: {', '.join(STAGES)})")
    if any(arg in ("-h", "--help") for arg in rest):
        print(usage())
        return 0
    args = parse(rest)
    plan = load(stage, args)
    if args.dry_run:
        prepare(plan, create_output=False)
        print(dry_run(plan), end="")
        return 0
    preflight(plan.slurm)
    plan.spec.check_inputs(plan.cfg)  # data, checkpoints, run folder, credentials: before any job exists
    refuse_if_running(plan)
    prepare(plan, create_output=True)
    if not plan.callables:  # an array stage with every shard done: only what follows from them may be missing
        print(f"mmfuse submit {stage}: {importlib.import_module(plan.spec.array).finish(plan.cfg)}", file=sys.stderr)
        return 0
    write_run_files(plan, argv)
    jobs = submit(plan)
    job_id = jobs[0].job_id.split("_")[0]
    where = "on this machine" if plan.slurm.executor == "local" else f"partition {plan.slurm.partition or '(default)'}"
    print(f"submitted job {job_id}: {stage}, {plan.summary}, {where}")
    print(f"run folder: {plan.run_dir}")
    print(f"logs:       {plan.folder / 'jobs'}/{job_id}{'_<array task>' if len(jobs) > 1 else ''}_<task>_log.out"
          f"  (rank 0: {rank0_log(jobs)})")
    sys.stdout.flush()
    if args.follow:
        return follow(plan, jobs)
    return 0
