"""Resuming pre-training in another shape: gradient accumulation extended to more steps, another world size or ZeRO
stage."""

import pytest

from tests.integration.pretraining import metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_gradient_accumulation_counts_optimizer_steps_and_resumes_bit_identically(shards, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("engine.grad_accum=2", "optim.warmup_steps=1", "run.checkpoint_every=0")
    # run.checkpoint_minutes: rank 0's clock, a checkpoint after every step here, all ranks at the same step
    pretrain(shards, full, "run.steps=4", "run.checkpoint_minutes=1e-6", "run.keep=10", *common)
    # A run of 2 steps extended to 4 from its last checkpoint follows the 4-step schedule from step 3 on.
    pretrain(shards, split, "run.steps=2", *common)
    pretrain(shards, split, "run.steps=4", *common)
    uninterrupted, resumed = metrics(full), metrics(split)
    assert [m["step"] for m in uninterrupted] == [1, 2, 3, 4]
    assert [m["samples_seen"] for m in uninterrupted] == [32, 64, 96, 128]  # 2 micro-batches x 8 x 2 ranks
    assert uninterrupted[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ends at the last optimizer step
    assert [m["loss"] for m in resumed[-2:]] == [m["loss"] for m in uninterrupted[-2:]]
    tags = sorted(p.name for p in (full / "checkpoints").iterdir() if (p / "COMMITTED").is_file())
    assert tags == [f"step_00000{step}" for step in (1, 2, 3, 4)]


def test_resume_at_another_world_size_or_zero_stage(shards, tmp_path):
    run = tmp_path / "resize"
    pretrain(shards, run, "run.steps=3", "run.checkpoint_every=0", "launch.nproc=2")
    pretrain(shards, run, "run.steps=5", "run.checkpoint_every=0", "launch.nproc=1")
    assert (run / "checkpoints" / "step_000003_universal").is_dir()
    pretrain(shards, run, "run.steps=7", "run.checkpoint_every=0", "launch.nproc=2", "engine.zero_stage=1")
    assert (run / "checkpoints" / "step_000005_universal").is_dir()
    rows = metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 8))
    assert all(m["loss"] == m["loss"] for m in rows)
    # The optimizer and schedule carried over: samples seen keep counting across the changes.
    assert rows[3]["samples_seen"] > rows[2]["samples_seen"] and rows[5]["samples_seen"] > rows[4]["samples_seen"]
    assert (run / "checkpoints" / "step_000007" / "COMMITTED").is_file()
    refused = pretrain(shards, run, "run.steps=9", "launch.nproc=2", "engine.zero_stage=3", check=False)
    assert refused.returncode != 0 and "written with ZeRO stage 1" in refused.stderr
