"""The callable submitted for a stage: one instance runs in every task of the job.

In each task it translates SLURM's variables into the torch ones, runs the stage's ``run(cfg)``, and handles the
end of an allocation:

- The checkpoint signal (submitit's preemption signal, SIGUSR2: sent ``slurm.signal_delay_s`` before the time
  limit, or by hand with ``scancel --signal=USR2``; SIGUSR1 too) asks the stage to stop. The stage checkpoints
  (pretrain: every rank at the same step), returns, and rank 0 requeues the job through submitit: ``checkpoint()``
  gives the callable the requeued job runs, ``scontrol requeue`` puts it back in the queue. The requeued job keeps
  its job id and run folder and resumes from the last committed checkpoint (``run.resume=auto``). At most
  ``slurm.max_requeue`` times.
- SIGTERM (``scontrol requeue``, preemption with PreemptMode=REQUEUE, ``scancel``, the time limit itself): the
  stage checkpoints and the task exits; SLURM decides whether the job comes back.

Under submitit's local executor the same holds: its controller sends SIGUSR2 to every task ``signal_delay_s``
before its time limit (or send it by hand to the tasks, the controller's children), rank 0 exits with submitit's
requeue code and the controller starts the tasks again (at most ``slurm.max_requeue`` times, and at most 5: the
controller's own limit). SIGTERM to the controller (the job id) is passed on to the tasks: they checkpoint and the job ends.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import submitit

from mmfuse.launch import skip_the_exit_collection
from mmfuse.logs import setup_logging as _setup_logging
from slurm.env import torch_env
from slurm.stages import STAGES

log = logging.getLogger("mmfuse.slurm")
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


class RequeueLimit(RuntimeError):
    pass


class StageTask(submitit.helpers.Checkpointable):
    """``StageTask("pretrain", cfg, max_requeue)()``: picklable, holds only the stage name and resolved configs.

    It pickles its config as YAML, so unpickling it in a fresh task imports neither the stage nor torch: the
    task's signal handlers are in place within a second of its start, not after the stage's imports (a time-limit
    signal can come early; before any handler it would kill the task).
    """

    def __init__(self, stage: str, cfg: Any, max_requeue: int, requeues: int = 0):
        self.stage, self.max_requeue, self.requeues = stage, max_requeue, requeues
        self._cfg, self._yaml = cfg, None

    def __getstate__(self) -> dict:
        from mmfuse.config import to_yaml

        return {"stage": self.stage, "max_requeue": self.max_requeue, "requeues": self.requeues,
                "_cfg": None, "_yaml": self._yaml if self._cfg is None else to_yaml(self._cfg)}

    @property
    def cfg(self) -> Any:
        if self._cfg is None:
            from omegaconf import OmegaConf

            # Already resolved and validated at submission: rebuild the dataclass, nothing is merged over it.
            from mmfuse.config import apply_renames, renamed_keys

            schema = OmegaConf.structured(STAGES[self.stage].load_schema())
            # A job submitted before a key was renamed and requeued after reads it under its new name.
            saved = apply_renames(OmegaConf.create(self._yaml), renamed_keys(schema), "the submitted job's config")
            self._cfg = OmegaConf.to_object(OmegaConf.merge(schema, saved))
        return self._cfg

    def __call__(self) -> Any:
        spec = STAGES[self.stage]
        stops = StopSignals() if spec.finished else None  # first: from here on no stop signal is lost
        env = torch_env(os.environ)
        os.environ.update(env)
        rank = int(env["RANK"])
        setup_logging(rank)
        link_rank_log(Path(spec.run_dir(self.cfg)), rank)
        log.info("%s: rank %s of %s, master %s:%s", self.stage, rank, env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"])
        result = spec.run(self.cfg)
        skip_the_exit_collection()  # submitit only writes the result after this: the job's process then ends
        if stops is None:
            return result
        seen = stops.close()
        if not seen or spec.finished(self.cfg):
            return result
        if signal.SIGTERM in seen:
            decides = ("submit the same command to resume" if submitit.JobEnvironment().cluster == "local"
                       else "SLURM decides whether the job is requeued")  # the local executor never restarts on SIGTERM
            log.warning("stopped by SIGTERM with a committed checkpoint; %s", decides)
            raise SystemExit(0)  # no result file: the job did not finish
        if rank == 0:
            self.requeue()
        raise SystemExit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What the requeued job runs: this stage with the same config (same run folder; the stage resumes from its
        last committed checkpoint), one more requeue counted."""
        return submitit.helpers.DelayedSubmission(StageTask(self.stage, self.cfg, self.max_requeue, self.requeues + 1),
                                                  *args, **kwargs)

    def requeue(self) -> None:
        """Rank 0, after the stage checkpointed: store checkpoint()'s callable as the job's submission, requeue."""
        done = max(self.requeues, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
        if done >= self.max_requeue:
            raise RequeueLimit(f"checkpoint committed, but the job was requeued {done} times already "
                               f"(slurm.max_requeue={self.max_requeue}): not requeueing; submit the same command to resume")
        environment = submitit.JobEnvironment()
        delayed = self.checkpoint()
        delayed.set_timeout(0, self.max_requeue - done - 1)
        pickle = environment.paths.submitted_pickle
        tmp = pickle.with_name(pickle.name + ".requeue")
        delayed.dump(tmp)
        os.replace(tmp, pickle)
        log.warning("checkpoint committed; requeueing job %s (%d of slurm.max_requeue=%d)", environment.job_id,
                    done + 1, self.max_requeue)
        environment._requeue(self.max_requeue - done - 1)  # scontrol requeue; the local executor exits to restart


class StopSignals:
    """Which stop signals reached this process while the stage ran, and delivery of early ones to the stage.

    The stage installs its own SIGTERM/SIGUSR1 handlers (checkpoint at the next step boundary), replacing ours,
    so the signals are recorded through Python's wakeup fd, which every Python-level handler writes to. A signal
    that arrives before the stage installed its handlers is held and re-sent once it has.
    """

    def __init__(self):
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self.pending: list[int] = []
        for sig in (signal.SIGTERM, *REQUEUE_SIGNALS):
            signal.signal(sig, self._hold)
        # submitit's own handler for its preemption signal (SIGUSR2) would requeue at once, before the checkpoint:
        # forward it to the stage as SIGUSR1 instead; the requeue happens after the stage returns.
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._deliver, daemon=True)
        self._thread.start()

    def _hold(self, signum: int, frame) -> None:
        stage_handler = signal.getsignal(signal.SIGUSR1)
        if signum == signal.SIGUSR2 and callable(stage_handler) and stage_handler != self._hold:
            stage_handler(signal.SIGUSR1, frame)
            return
        log.warning("got signal %d before the stage could checkpoint; holding it until it can", signum)
        self.pending.append(signal.SIGUSR1 if signum == signal.SIGUSR2 else signum)

    def _deliver(self) -> None:
        while not self._stop.wait(0.2):
            if signal.getsignal(signal.SIGUSR1) != self._hold and signal.getsignal(signal.SIGTERM) != self._hold:
                for signum in self.pending:  # the stage's handlers are in place: hand it what it missed
                    os.kill(os.getpid(), signum)
                self.pending.clear()
                return

    def close(self) -> set[int]:
        self._stop.set()
        signal.set_wakeup_fd(self._previous_fd)
        seen = set()
        try:
            seen = set(os.read(self._read, 4096))
        except BlockingIOError:
            pass
        os.close(self._read)
        os.close(self._write)
        return seen


def setup_logging(rank: int) -> None:
    _setup_logging(rank, force=True)
    logging.getLogger("submitit").propagate = False  # it has its own handler


def link_rank_log(run_dir: Path, rank: int) -> None:
    """``RUN/logs/rank<N>.log`` → this task's log file (submitit's, in the job folder), for ``tail -f``."""
    if "://" in str(run_dir):
        return
    try:
        target = submitit.JobEnvironment().paths.stdout
        link = run_dir / "logs" / f"rank{rank}.log"
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except OSError as err:  # a log link is a convenience; never fail the job over it
        log.warning("could not link %s: %s", run_dir / "logs", err)
