"""Real multi-process DeepSpeed pre-training over gloo on the synthetic shapes world (tiny flavor)."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmfuse.cli import main as cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def command(shards, run_dir, *overrides):
    return [sys.executable, "-m", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.train={shards}",
            f"run.dir={run_dir}", "data.batch_size=8", "data.workers=1", "data.shuffle_window=16", "run.log_every=1",
            "optim.warmup_steps=2", "optim.lr=2e-3", *overrides]


def pretrain(shards, run_dir, *overrides, check=True):
    result = subprocess.run(command(shards, run_dir, *overrides), capture_output=True, text=True, timeout=540)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
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


def test_zero3_all_objectives_with_missing_modalities(shards, tmp_path):
    run = tmp_path / "z3"
    # Gradient checkpointing recomputes the blocks in backward, where ZeRO-3 must gather their parameters again.
    # The in-loop evaluation embeds its zero-shot classifier on every rank (a rank-0-only forward waits forever).
    pretrain(shards, run, "run.steps=3", "engine.zero_stage=3", "run.checkpoint_every=0",
             "engine.gradient_checkpointing=[image,text,audio]", f"data.eval={shards}", "eval.batch_size=16",
             "objectives.cross_modal_masked.patches=true")
    rows = metrics(run)
    assert any(k.startswith("eval/zeroshot/") for k in rows[-1]), rows[-1]
    last = [m for m in rows if "loss" in m][-1]
    for name in ("contrastive/image_text", "contrastive/audio_text", "contrastive/image_audio", "masked_image",
                 "masked_audio", "masked_text", "cross_modal_masked", "cross_modal_masked/image"):
        assert f"loss/{name}" in last and last[f"loss/{name}"] == last[f"loss/{name}"]
    assert (run / "checkpoints" / "step_000003" / "COMMITTED").is_file()
    # The patch objective's head is part of the model: config.yaml records it, so the export rebuilds it.
    from pretrain.release import load_release

    assert cli(["export", str(run), f"output.path={tmp_path}/release"]) == 0
    assert load_release(str(tmp_path / "release"))[0].fused_patch_decoder is not None


def test_offloaded_optimizer_and_parameters_train_like_no_offload(shards, zero2_run, tmp_path):
    """ZeRO-Offload changes where the optimizer state and (ZeRO-3) the parameters live, not the update. (The first
    3 losses see the first 2 updates, at warmup's learning rates: the same in a 3-step run as in the 10-step one.)"""
    reference = [m["loss"] for m in zero2_run][:3]
    for name, offload in {"optimizer": ["engine.offload_optimizer=true"],
                          "both": ["engine.zero_stage=3", "engine.offload_optimizer=true", "engine.offload_params=true"]}.items():
        pretrain(shards, tmp_path / name, "run.steps=3", "run.checkpoint_every=0", "run.save_at_end=false", *offload)
        assert [m["loss"] for m in metrics(tmp_path / name)] == pytest.approx(reference, rel=1e-4), name


def test_bf16_weights_take_float_inputs_in_their_dtype_train_evaluate_and_export(shards, tmp_path):
    """DeepSpeed's bf16 holds the weights in bf16 (fp32 master copies in the optimizer): every floating input is
    cast to it (images, mel spectrograms), in training and in the in-loop evaluation; the losses are computed in
    fp32. CPUs run bf16 too, so this is the GPU's default precision, tested without a GPU."""
    import torch

    from pretrain.release import load_release

    run = tmp_path / "bf16"
    pretrain(shards, run, "run.steps=10", "engine.precision=bf16", "run.checkpoint_every=0", f"data.eval={shards}",
             "run.eval_every=5", "eval.batch_size=16")
    rows = metrics(run)
    losses = [m["loss"] for m in rows if "loss" in m]
    assert len(losses) == 10 and all(v == v for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    evals = [m for m in rows if any(k.startswith("eval/") for k in m)]
    assert [m["step"] for m in evals] == [0, 5, 10], evals  # step 0: the untrained baseline
    assert all(0 <= v <= 100 for m in evals for k, v in m.items() if k.startswith("eval/")), evals
    assert cli(["export", str(run), f"output.path={tmp_path}/release"]) == 0
    model, _ = load_release(str(tmp_path / "release"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the optimizer's fp32 master weights
    with torch.no_grad():
        assert torch.isfinite(model.embed("image", torch.randn(2, 3, 64, 64))).all()


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


def test_export_from_zero1_keeps_the_frozen_towers(shards, tmp_path):
    """ZeRO-1's consolidation reads the optimizer partitions, which hold no frozen parameter: an image-text run's
    audio tower (and masked-text parts) come from rank 0's model file instead."""
    import torch

    from pretrain.release import load_release

    run = tmp_path / "z1"
    pretrain(shards, run, "run.steps=2", "engine.zero_stage=1", "run.checkpoint_every=0", "launch.nproc=2",
             "objectives.contrastive.pairs={audio_text: 0, image_audio: 0}", "objectives.masked_image.weight=0",
             "objectives.masked_audio.weight=0", "objectives.masked_text.weight=0",
             "objectives.cross_modal_masked.weight=0")
    assert cli(["export", str(run), f"output.path={tmp_path}/release"]) == 0
    model, _ = load_release(str(tmp_path / "release"))
    saved = torch.load(run / "checkpoints" / "step_000002" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    frozen = [k for k in saved if k.startswith("model.audio.")]
    assert frozen and all(torch.equal(model.state_dict()[k.removeprefix("model.")], saved[k].float()) for k in frozen)


def test_export_from_zero3_loads_in_open_clip_with_identical_embeddings(shards, tmp_path):
    import open_clip
    import torch

    from pretrain.release import load_release

    run = tmp_path / "z3export"
    # SigLIP end to end: its bias is a second loose parameter under ZeRO-3, and open_clip's export carries it.
    pretrain(shards, run, "run.steps=2", "engine.zero_stage=3", "run.checkpoint_every=0", "launch.nproc=2",
             "model.contrastive=siglip", "model.image.stem=patch")  # open_clip builds the patch stem only
    assert cli(["export", str(run), f"output.path={tmp_path}/release"]) == 0
    model, release = load_release(str(tmp_path / "release"))
    assert release["source"]["checkpoint"] == "step_000002" and release["model"]["flavor"] == "tiny"
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}/release")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}/release")
    images, text = torch.randn(3, 3, 64, 64), tokenizer(["a red circle", "two blue squares", "a green star"])
    model.eval(), reference.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed("image", images), torch.nn.functional.normalize(reference.encode_image(images), dim=-1), atol=1e-6)
        assert torch.allclose(model.embed("text", text), torch.nn.functional.normalize(reference.encode_text(text), dim=-1), atol=1e-6)
    assert reference.logit_scale.shape == () and reference.logit_bias.shape == ()
    assert reference.logit_bias.item() == model.logit_bias.item() != -10.0  # trained away from its initial value
    # The trained weights, not the initial ones (the trainer seeds with seed=0, then builds the model).
    from pretrain.model import MultimodalModel
    torch.manual_seed(0)
    initial = MultimodalModel(model.cfg)
    assert not torch.equal(initial.state_dict()["clip.visual.proj"], model.state_dict()["clip.visual.proj"])


def test_export_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["export", str(tmp_path / "empty")]) == 1
    assert "no committed checkpoint" in capsys.readouterr().err


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


def test_keep_best_keeps_the_evaluation_winner_and_export_releases_it(shards, tmp_path):
    run = tmp_path / "best"
    pretrain(shards, run, "run.steps=6", "launch.nproc=1", "engine.zero_stage=0", "run.checkpoint_every=0",
             "run.keep=1", "run.eval_every=2", f"data.eval={shards}", "eval.batch_size=16",
             "run.keep_best=retrieval/image_to_text/R@1")
    scores = {m["step"]: m["eval/retrieval/image_to_text/R@1"] for m in metrics(run) if "eval/samples" in m}
    assert sorted(scores) == [0, 2, 4, 6]  # step 0 (untrained) is a baseline, not a candidate
    winner = max((2, 4, 6), key=lambda step: (scores[step], -step))  # a tie keeps the earlier step
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["value"], best["evaluations"]) == (winner, scores[winner], 3)
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == sorted({f"step_{winner:06d}", "step_000006"})  # run.keep=1 and the best
    assert cli(["export", str(run), f"output.path={tmp_path}/release"]) == 0
    source = json.loads((tmp_path / "release" / "config.json").read_text())["source"]
    assert source["checkpoint"] == f"step_{winner:06d}"
    assert source["selected_by"].startswith("run.keep_best: retrieval/image_to_text/R@1 = ")
    assert "selected_by" in (tmp_path / "release" / "README.md").read_text()


def test_keep_best_with_a_metric_the_evaluation_lacks_fails_at_step_0(shards, tmp_path):
    """Both ranks stop on the same bad input: the launcher prints its line once, no rank prints a traceback. The
    launch's warnings (here: 64 px shards for a 128 px model) come once too, from the launcher, not per rank."""
    result = pretrain(shards, tmp_path / "typo", "run.steps=50", "launch.nproc=2", f"data.eval={shards}",
                      "eval.batch_size=16", "run.keep_best=zeroshot/image/top_1", "model.image.image_size=128", check=False)
    assert result.returncode == 1
    assert result.stderr.count("holds images at 64 px and the model reads 128 px") == 1, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(said) == 1 and said[0].startswith("mmfuse pretrain: error: run.keep_best=zeroshot/image/top_1 is not a "
                                                 "metric of this run's evaluation; it has: "), result.stderr[-3000:]
    assert "zeroshot/image/top1" in said[0] and "Traceback" not in result.stderr
    assert not list((tmp_path / "typo").glob("checkpoints/step_*"))  # nothing trained
    result = pretrain(shards, tmp_path / "noeval", "run.keep_best=zeroshot/image/top1", check=False)
    assert result.returncode != 0 and "run.keep_best=zeroshot/image/top1 picks a checkpoint by an in-loop evaluation: set data.eval" in result.stderr
