"""Real multi-process DeepSpeed pre-training over gloo on the synthetic shapes world (tiny flavor)."""

import math
import re
import signal
import subprocess
import time

import pytest
import torch

from tests.integration.pretraining import command, metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def zero2_run(shards, tmp_path_factory):
    """10 steps of ZeRO-2 at 2 ranks, uninterrupted: the reference run of several tests."""
    full = tmp_path_factory.mktemp("zero2") / "full"
    pretrain(shards, full, "run.steps=10", "run.checkpoint_every=5")
    return metrics(full)


def test_zero2_trains_and_resumes_bit_identically(shards, zero2_run, tmp_path):
    uninterrupted = zero2_run
    losses = [m["loss"] for m in uninterrupted]
    assert len(losses) == 10 and all(map(lambda v: v == v, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns

    # Same command, stopped part-way by SIGUSR1 to rank 1 alone (the slurm launcher's signal; every rank must agree
    # and checkpoint at the same step), then rerun.
    import psutil

    split = tmp_path / "split"
    proc = subprocess.Popen(command(shards, split, "run.steps=10", "run.checkpoint_every=0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (split / "metrics.jsonl").exists() or len(metrics(split)) < 3:
        time.sleep(0.2)
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.name() == "mmfuse rank 1"]
    rank1.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    stopped_at = len(metrics(split))
    assert 3 <= stopped_at < 10
    assert (split / "checkpoints" / f"step_{stopped_at:06d}" / "COMMITTED").is_file()
    pretrain(shards, split, "run.steps=10", "run.checkpoint_every=0")  # resume=auto picks the signal checkpoint
    resumed = metrics(split)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    for a, b in zip(uninterrupted, resumed):
        assert {k: v for k, v in a.items() if k.startswith(("loss", "lr"))} == {k: v for k, v in b.items() if k.startswith(("loss", "lr"))}
        assert a["samples_seen"] == b["samples_seen"]


def test_sigterm_to_the_whole_process_group_checkpoints_and_resumes_bit_identically(shards, zero2_run, tmp_path):
    """What a terminal's Ctrl-C-like stop, `kill -TERM -PGID` or a container runtime does: the launcher and both ranks
    get SIGTERM at once. Every rank checkpoints at the same step; the rerun resumes and each step appears once."""
    import os

    run = tmp_path / "term"
    proc = subprocess.Popen(command(shards, run, "run.steps=10", "run.checkpoint_every=0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "metrics.jsonl").exists() or len(metrics(run)) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    stopped_at = len(metrics(run))
    assert 3 <= stopped_at < 10
    assert (run / "checkpoints" / f"step_{stopped_at:06d}" / "COMMITTED").is_file()
    pretrain(shards, run, "run.steps=10", "run.checkpoint_every=0")
    resumed = metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 11))
    for a, b in zip(zero2_run, resumed):
        assert {k: v for k, v in a.items() if k.startswith(("loss", "lr"))} == {k: v for k, v in b.items() if k.startswith(("loss", "lr"))}


def test_a_run_that_skipped_many_samples_says_so_loudly_at_the_end(tmp_path):
    from tests.loaderdata import sample, write_tar

    items = [sample(f"k{i:04d}", i) for i in range(48)]
    for item in items[::3]:  # a third of the images are not images
        item["jpg"] = b"<html>not found</html>"
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "shard-000000.tar", items)
    result = pretrain(tmp_path / "data" / "shard-000000.tar", tmp_path / "run", "run.steps=4", "launch.nproc=1",
                      "engine.zero_stage=0", "run.save_at_end=false", "run.checkpoint_every=0",
                      "objectives.contrastive.pairs.audio_text=0", "objectives.contrastive.pairs.image_audio=0",
                      "objectives.masked_audio.weight=0", "model.image.image_size=64")
    banner = re.search(r"(\d+\.\d)% of the training samples read were skipped \((\d+) of (\d+)\)", result.stderr)
    assert banner, result.stderr[-3000:]
    assert 25 <= float(banner.group(1)) <= 40 and int(banner.group(2)) > 0


def test_offloaded_optimizer_and_parameters_train_like_no_offload(shards, zero2_run, tmp_path):
    """ZeRO-Offload changes where the optimizer state and (ZeRO-3) the parameters live, not the update. (The first
    3 losses see the first 2 updates, at warmup's learning rates: the same in a 3-step run as in the 10-step one.)"""
    reference = [m["loss"] for m in zero2_run][:3]
    for name, offload in {"optimizer": ["engine.offload_optimizer=true"],
                          "both": ["engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true"]}.items():
        pretrain(shards, tmp_path / name, "run.steps=3", "run.checkpoint_every=0", "run.save_at_end=false", *offload)
        assert [m["loss"] for m in metrics(tmp_path / name)] == pytest.approx(reference, rel=1e-4), name


def test_the_untrained_baseline_evaluation_leaves_training_unchanged(shards, tmp_path):
    losses = {}
    for flag in ("true", "false"):
        run = tmp_path / flag
        pretrain(shards, run, "run.steps=3", "launch.nproc=1", "engine.zero_stage=0", "run.checkpoint_every=0",
                 "run.save_at_end=false", f"data.eval={shards}", "eval.batch_size=16", f"run.eval_untrained={flag}")
        rows = metrics(run)
        losses[flag] = [m["loss"] for m in rows if "loss" in m]
        assert [m["step"] for m in rows if "eval/samples" in m] == ([0, 3] if flag == "true" else [3])
    assert losses["true"] == losses["false"]


@pytest.mark.parametrize("where, overrides", [
    ("loss", ["engine.grad_accum=2"]),  # micro-batch 1 of 2: the update of both is dropped (ZeRO-2's own check)
    ("grad", ["engine.zero_stage=0"]),  # a finite loss with a NaN gradient, on plain fp32 (the trainer's check)
])
def test_a_nonfinite_step_is_detected_on_its_step_and_skipped(shards, tmp_path, where, overrides):
    run = tmp_path / "skip"
    result = pretrain(shards, run, "run.steps=3", "run.debug_nan_step=2", f"run.debug_nan_in={where}",
                      "run.checkpoint_every=0", "run.save_at_end=false", *overrides)
    rows = metrics(run)
    assert [m["skipped_steps"] for m in rows] == [0, 1, 1]
    assert f"non-finite {where}" in result.stderr
    # No update at step 2: the temperature, which every step trains, stays; step 3 moves it again.
    scales = [m["logit_scale"] for m in rows]
    assert scales[0] == scales[1] != scales[2]
    assert not math.isfinite(rows[1]["grad_norm"]) and math.isfinite(rows[2]["grad_norm"]) and rows[2]["grad_norm"] > 0


def test_a_nonfinite_loss_halts_with_a_checkpoint_naming_the_rank_and_its_samples(shards, tmp_path):
    halt = tmp_path / "halt"
    result = pretrain(shards, halt, "run.steps=3", "run.debug_nan_step=2", "run.nonfinite=halt", check=False)
    assert result.returncode != 0 and "non-finite loss at step 2 on rank(s) [1]; checkpoint saved" in result.stderr
    assert re.search(r"non-finite loss at step 2 \(micro-batch 0\) on rank 1, sample keys \['\d+'", result.stderr)
    assert (halt / "checkpoints" / "step_000002" / "COMMITTED").is_file()


def test_bad_config_fails_before_any_process_starts(shards, tmp_path):
    result = pretrain(shards, tmp_path / "bad", "engine.zero_stage=5", check=False)
    assert result.returncode != 0 and "engine.zero_stage" in result.stderr
    result = pretrain(shards, tmp_path / "bad", f"run.resume={tmp_path}/nowhere", check=False)
    assert result.returncode != 0 and "not a committed checkpoint" in result.stderr
    result = pretrain(shards, tmp_path / "bad", "engine.extra={zero_optimization: {stage: 3}}", check=False)
    assert result.returncode != 0 and "set engine.zero_stage instead" in result.stderr
    result = pretrain(shards, tmp_path / "bad", "data.audio.frames=200", check=False)
    assert result.returncode != 0 and "data.audio.frames=200 conflicts with the model's frames=192" in result.stderr
    if not torch.cuda.is_available():
        result = pretrain(shards, tmp_path / "bad", "engine.precision=fp16", check=False)
        assert result.returncode != 0 and "engine.precision=fp16 needs a GPU" in result.stderr
    assert "[rank" not in result.stderr and not (tmp_path / "bad").exists()  # no rank started, nothing written


