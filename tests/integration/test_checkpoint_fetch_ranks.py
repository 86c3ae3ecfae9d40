"""``run.resume=auto`` with ``run.checkpoint_sync`` on an empty run folder: rank 0 fetches the newest remote checkpoint
and every rank resumes from it, however late a rank gets there. A rank that arrived after rank 0's download once
found the checkpoint itself, skipped the barrier rank 0 waited in, and the run hung (seen in CI under load)."""

import datetime
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mmfuse.commits import MARKER
from pretrain.checkpoint import CheckpointManager

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def remote_checkpoint(root, tag="step_000002"):
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (root / tag / MARKER).write_text(tag)
    (root / "latest_committed").write_text(tag)


def rank_main(rank, port, run_dir, remote, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
    manager = CheckpointManager(run_dir, keep=2, rank=rank, world_size=2, zero_stage=1, sync_url=f"file://{remote}")
    if rank == 1:  # the late rank: it looks only once rank 0 has the whole checkpoint on disk
        while not (run_dir / "checkpoints" / "step_000002" / MARKER).exists():
            time.sleep(0.05)
        time.sleep(0.2)
    found = manager.resolve("auto")
    dist.barrier()  # the next collective: with ranks out of step it times out instead of passing
    results[rank] = None if found is None else found[1]
    dist.destroy_process_group()


def test_a_late_rank_resumes_from_the_checkpoint_rank_0_fetched(tmp_path):
    remote, run_dir = tmp_path / "remote", tmp_path / "run"
    remote_checkpoint(remote)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.start_processes(rank_main, args=(port, run_dir, remote, results), nprocs=2, start_method="spawn")
    assert dict(results) == {0: "step_000002", 1: "step_000002"}
    assert (run_dir / "checkpoints" / "step_000002" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
