"""Pre-training runs that end in a release: ZeRO-1 / ZeRO-3 / bf16 exports, open_clip loading, run.keep_best."""

import json

import pytest

from mmfuse.cli import main as cli
from tests.integration.pretraining import metrics, pretrain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


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
