"""``launch.nproc=N``: spawn N local ranks of the same command, the way torchrun would (standard env vars), for
every stage that trains (pretrain, finetune, eval). A rank stopped by bad input says so in one line, once."""

from __future__ import annotations

import contextlib
import glob
import importlib
import multiprocessing
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from mmfuse.redact import redact_text

ERRORS_ENV = "MMFUSE_RANK_ERRORS"
"""A folder where a spawned rank leaves the one-line error that stopped it, for the launcher to print once."""
FORK_ENV = "MMFUSE_FORK_RANKS"
"""Set to 0: every rank a fresh interpreter even where ``spawn_local`` would fork them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def says_warnings() -> bool:
    """Whether this process prints the warnings a launch raises (a dataset's shard size, ...): the launching
    process or, under an external launcher (torchrun, srun), rank 0; never a rank ``spawn_local`` started, whose
    launcher has said them already."""
    return ERRORS_ENV not in os.environ and os.environ.get("RANK", "0") == "0"


def rank_entry(stage: str, main: Callable[[], int]) -> int:
    """Run a rank's ``main``. Bad input the user can fix (a ValueError, as the CLI treats it) ends the rank with
    one line instead of a traceback: left for the launcher that spawned it, else printed with the rank's number."""
    from mmfuse.schema import ConfigError

    try:
        return main()
    except ValueError as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        message, rank = redact_text(str(err)), os.environ.get("RANK", "0")
        folder = os.environ.get(ERRORS_ENV)
        if folder:
            Path(folder, f"rank{rank}").write_text(f"{kind}: {message}", encoding="utf-8")
        else:
            where = f"[rank {rank}] " if "WORLD_SIZE" in os.environ else ""
            print(f"mmfuse {stage}: {kind}: {where}{message}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        skip_the_exit_collection()


def skip_the_exit_collection() -> None:
    """Called by a process about to exit: the interpreter's shutdown walks every live object once more for
    reference cycles, which after importing torch, DeepSpeed and open_clip took about 3 s of each rank's exit (a
    quarter of a short run's wall time). Frozen objects are left out of that walk; their memory goes back with the
    process either way, and nothing they hold (files, sockets) depends on it: those close by reference counting."""
    import gc

    gc.freeze()


def spawn_local(module: str, argv: list[str], nproc: int, port: int = 0, stage: str = "",
                warm: Sequence[str] = ()) -> int:
    """Run ``python -m module argv launch.nproc=0`` as ranks 0..nproc-1; if one fails, stop the others.
    Returns the first non-zero exit code (or 0). SIGTERM/SIGINT are forwarded so every rank can checkpoint.
    The ranks' one-line errors (``rank_entry``) are printed once each, naming the ranks when not all had it.

    On a machine without accelerators the modules in ``warm`` (torch, DeepSpeed, open_clip: about 8 s of CPU per
    process) are imported here once and the ranks are forked from this process, already loaded: a 2-rank run of
    3 steps took 32 s of CPU, now 23. Nothing here has run a torch operation, so no thread pool is broken by the
    fork. With a GPU (or any accelerator device) each rank is a fresh interpreter as before: importing DeepSpeed
    probes the device, and a device initialised before a fork is unusable after it. ``MMFUSE_FORK_RANKS=0`` asks
    for fresh interpreters anywhere."""
    fork = bool(warm) and not accelerator_devices() and os.environ.get(FORK_ENV, "1") != "0"
    if fork:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by the OpenMP runtime when torch loads
        for name in warm:
            with contextlib.suppress(ImportError):  # a rank that needs it says so itself
                importlib.import_module(name)
    with tempfile.TemporaryDirectory(prefix="mmfuse-ranks-") as errors:
        code = _run_ranks(module, argv, nproc, port or free_port(), errors, fork)
        said: dict[str, list[str]] = {}
        for path in sorted(Path(errors).iterdir(), key=lambda p: int(p.name.removeprefix("rank"))):
            said.setdefault(path.read_text(encoding="utf-8"), []).append(path.name.removeprefix("rank"))
    for message, ranks in said.items():
        kind, _, message = message.partition(": ")
        where = "" if len(ranks) == nproc else f" [rank {', '.join(ranks)}]"
        print(f"mmfuse {stage or module}: {kind}:{where} {message}", file=sys.stderr)
    return code


def accelerator_devices() -> list[str]:
    """Device nodes of GPUs and other accelerators on this machine (NVIDIA, AMD, Intel, Gaudi), found without
    loading any driver."""
    patterns = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dri/renderD*", "/dev/accel/*", "/dev/hl[0-9]*")
    return [path for pattern in patterns for path in glob.glob(pattern)]


class _ForkedRank:
    """A rank forked from the launcher, answering like the ``subprocess.Popen`` of an exec'd one."""

    def __init__(self, module: str, argv: list[str], env: dict[str, str]):
        self.process = multiprocessing.get_context("fork").Process(target=_forked_rank, args=(module, argv, env),
                                                                     name=f"rank {env['RANK']}")
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.process.terminate()


def _forked_rank(module: str, argv: list[str], env: dict[str, str]) -> None:
    """In the forked rank: what ``python -m module argv`` would run, in this rank's environment, with the
    launcher's logging and exit hooks (its temporary folder) left behind."""
    import atexit
    import logging

    atexit._clear()
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
    logging.root.setLevel(logging.WARNING)
    os.environ.update(env)
    _name_process(f"mmfuse rank {env['RANK']}")
    if "torch" in sys.modules:  # the OpenMP runtime read OMP_NUM_THREADS when the launcher loaded torch
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [sys.argv[0], *argv]
    # The launcher imported the module already (the CLI reads its config first): running it again as __main__ is
    # the point, so runpy's warning about that would only repeat once per rank.
    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except (SystemExit, KeyboardInterrupt) as stop:
        if isinstance(stop, KeyboardInterrupt):
            sys.excepthook(*sys.exc_info())
            stop = SystemExit(130)
        raise stop
    except BaseException:  # printed as the interpreter would (sys.excepthook redacts), not as multiprocessing does
        sys.excepthook(*sys.exc_info())
        raise SystemExit(1) from None
    finally:
        atexit._run_exitfuncs()  # this rank's own hooks, as at interpreter exit (data_pipeline's worker reaper)


def _name_process(name: str) -> None:
    """What ps, top and psutil's ``name()`` show for this process (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])


def _run_ranks(module: str, argv: list[str], nproc: int, port: int, errors: str, fork: bool) -> int:
    procs = []
    for rank in range(nproc):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), ERRORS_ENV: errors}
        if fork:
            procs.append(_ForkedRank(module, [*argv, "launch.nproc=0"], env))
        else:  # like torchrun: one thread per rank unless told otherwise, so N ranks do not oversubscribe the cores
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv, "launch.nproc=0"],
                                          env={"OMP_NUM_THREADS": "1", **os.environ, **env}))

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        code = 0
        while any(proc.poll() is None for proc in procs):
            failed = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
            if failed and not code:
                code = failed[0]
                time.sleep(5)  # let the others notice (a collective fails) before stopping them
                for proc in procs:
                    if proc.poll() is None:
                        proc.terminate()
            time.sleep(0.2)
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
