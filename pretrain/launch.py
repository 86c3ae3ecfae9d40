"""``launch.nproc=N``: spawn N local ranks of the same command, the way torchrun would (standard env vars)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(module: str, argv: list[str], nproc: int, port: int = 0) -> int:
    """Run ``python -m module argv launch.nproc=0`` as ranks 0..nproc-1; if one fails, stop the others.
    Returns the first non-zero exit code (or 0). SIGTERM/SIGINT are forwarded so every rank can checkpoint."""
    port = port or free_port()
    procs = []
    for rank in range(nproc):
        # Like torchrun: one thread per rank unless told otherwise, so N ranks do not oversubscribe the cores.
        env = {"OMP_NUM_THREADS": "1", **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
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
