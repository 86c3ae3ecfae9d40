"""``launch.nproc=N``: spawn N local ranks of the same command, the way torchrun would (standard env vars), for
every stage that trains (pretrain, finetune, eval). A rank stopped by bad input says so in one line, once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mmfuse.redact import redact_text

ERRORS_ENV = "MMFUSE_RANK_ERRORS"
"""A folder where a spawned rank leaves the one-line error that stopped it, for the launcher to print once."""


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


def spawn_local(module: str, argv: list[str], nproc: int, port: int = 0, stage: str = "") -> int:
    """Run ``python -m module argv launch.nproc=0`` as ranks 0..nproc-1; if one fails, stop the others.
    Returns the first non-zero exit code (or 0). SIGTERM/SIGINT are forwarded so every rank can checkpoint.
    The ranks' one-line errors (``rank_entry``) are printed once each, naming the ranks when not all had it."""
    with tempfile.TemporaryDirectory(prefix="mmfuse-ranks-") as errors:
        code = _run_ranks(module, argv, nproc, port or free_port(), errors)
        said: dict[str, list[str]] = {}
        for path in sorted(Path(errors).iterdir(), key=lambda p: int(p.name.removeprefix("rank"))):
            said.setdefault(path.read_text(encoding="utf-8"), []).append(path.name.removeprefix("rank"))
    for message, ranks in said.items():
        kind, _, message = message.partition(": ")
        where = "" if len(ranks) == nproc else f" [rank {', '.join(ranks)}]"
        print(f"mmfuse {stage or module}: {kind}:{where} {message}", file=sys.stderr)
    return code


def _run_ranks(module: str, argv: list[str], nproc: int, port: int, errors: str) -> int:
    procs = []
    for rank in range(nproc):
        # Like torchrun: one thread per rank unless told otherwise, so N ranks do not oversubscribe the cores.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               ERRORS_ENV: errors}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv, "launch.nproc=0"], env=env))

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
