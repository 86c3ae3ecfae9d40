"""The model card (README.md) of a release: written with the release, from the run folder by ``mmfuse export``,
from the weights and config.json alone by ``save_release`` without one; never a credential."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from mmfuse.cli import main as cli
from mmfuse.config import load_config, to_yaml
from pretrain.config import PretrainConfig
from pretrain.model import ModelConfig, MultimodalModel
from mmfuse.commits import MARKER

pytestmark = pytest.mark.timeout(240)

OBJECTIVES = ("contrastive", "masked_image", "masked_audio", "masked_text", "cross_modal_masked")


def card(release) -> str:
    return (release / "README.md").read_text(encoding="utf-8")


def eval_rows(metrics: dict, untrained: dict | None) -> list[str]:
    """The card's result rows for one metrics.jsonl eval line: each figure to one decimal, as the card shows it."""
    was = lambda key: f" {untrained[key]:.1f} |" if untrained else ""
    rows = []
    for modality in ("image", "audio"):
        key = f"eval/zeroshot/{modality}/top1"
        if key in metrics:
            rows.append(f"| {modality} | {metrics[key]:.1f} | {metrics[key[:-1] + '5']:.1f} |{was(key)} "
                        f"{metrics['eval/zeroshot/chance_top1']:.1f} |")
    for key in (k for k in metrics if k.endswith("/R@1")):
        pair = key.split("/")[2].replace("_to_", " → ")
        rows.append(f"| {pair} | {metrics[key]:.1f} | {metrics[key[:-1] + '10']:.1f} |{was(key)} "
                    f"{100 / metrics['eval/samples']:.2f} |")
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real two-step image-text + MAE run (ZeRO-2, one process, step-0 evaluation on) on the synthetic shapes
    world, exported with license fields: about 40 s on two CPU cores."""
    root = tmp_path_factory.mktemp("card")
    assert cli(["synth", f"output.path={root}/raw", "num_samples=16", "image_size=64", "seed=3"]) == 0
    assert cli(["shard", f"input.path={root}/raw/manifest.parquet", f"output.path={root}/shards",
                "output.samples_per_shard=8", "image.size=64", "image.resize_mode=center_crop", "progress=false"]) == 0
    run = root / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.train={root}/shards",
         f"data.eval={root}/shards", f"run.dir={run}", "data.batch_size=8", "data.workers=0", "data.shuffle_window=8",
         "run.log_every=1", "run.steps=2", "run.checkpoint_every=0", "launch.nproc=0", "engine.zero_stage=2",
         "optim.warmup_steps=1", "model.image.stem=patch", "objectives.masked_audio.weight=0", "objectives.masked_text.weight=0",
         "objectives.cross_modal_masked.weight=0", "objectives.contrastive.pairs.audio_text=0",
         "objectives.contrastive.pairs.image_audio=0"], capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    release = root / "release"
    assert cli(["export", str(run), f"output.path={release}", "release.license=apache-2.0",
                "release.data_license=CC-BY-4.0"]) == 0
    return run, release


def test_the_card_of_an_export_says_what_the_run_did(exported):
    run, release = exported
    text, config = card(release), yaml.safe_load((run / "config.yaml").read_text())
    assert f"(flavor `{config['model']['flavor']}`)" in text and "| Flavor | `tiny` |" in text
    assert f"- Steps: {config['run']['steps']} (of `run.steps={config['run']['steps']}`)" in text
    assert "- Devices: 1 process (CPU)" in text and "- DeepSpeed ZeRO stage 2, precision auto: fp32" in text
    for name in OBJECTIVES:
        weight = config["objectives"][name]["weight"]
        assert (f"| `{name}` | {weight:g} |" in text) == (weight > 0), name
    assert "pairs image_text 1 |" in text  # the pairs switched off are not listed
    assert "Off (weight 0): `masked_audio`, `masked_text`, `cross_modal_masked`." in text
    assert "| audio tower |" in text and text.split("| audio tower |")[1].split("\n")[0].endswith("| no |")
    for template in config["eval"]["templates"]:
        assert f"`{template}`" in text
    assert "| License | apache-2.0 |" in text and "| Training data license | CC-BY-4.0 |" in text
    assert json.loads((release / "config.json").read_text())["release"]["license"] == "apache-2.0"

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/samples" in row]
    assert [row["step"] for row in evals] == [0, 2]  # step 0: the untrained model
    assert f"In-loop evaluation at step 2 on {evals[-1]['eval/samples']:.0f} held-out samples" in text
    for row in eval_rows(evals[-1], untrained=evals[0]):
        assert row in text, row
    assert f"- Samples seen: {[row for row in rows if 'samples_seen' in row][-1]['samples_seen']}\n" in text
    assert "- Training data (1 dataset, 2 shards): " in text

    assert f"mmfuse export {run} step=2 output.path={release} release.license=apache-2.0 release.data_license=CC-BY-4.0" in text
    assert f"mmfuse eval --config configs/finetune/zeroshot.yaml checkpoint={release} data.eval={run.parent}/shards" in text
    assert f"mmfuse finetune --config configs/finetune/zeroshot.yaml checkpoint={release} flavor=tiny" in text
    # The open_clip lines work as written.
    import open_clip

    line = next(line for line in text.splitlines() if "create_model_and_transforms" in line)
    assert line.endswith(f'create_model_and_transforms("local-dir:{release}")')
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{release}")
    assert isinstance(model, open_clip.CLIP)


def hand_made_run(root, train: str, steps=(2, 4), world_size=2):
    """A run folder as pre-training writes it, by hand: config.yaml, metrics.jsonl with the untrained evaluation
    and one after each checkpoint, and ZeRO-0 checkpoints (rank 0's model file holds the module)."""
    cfg = load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"],
                      [f"data.train={train}", "data.eval=/data/held-out", f"run.dir={root}", "run.steps=4",
                       "engine.zero_stage=0", "objectives.masked_text.weight=0", "model.image.stem=conv",
                       "model.text.vocab_size=1024"])  # small vocabulary heads: a quick export
    (root / "config.yaml").write_text(to_yaml(cfg))  # not redacted: as a hand-edited config.yaml could be
    model = MultimodalModel(cfg.model)

    def evaluation(step, score):
        return {"step": step, "eval/samples": 40.0, "eval/zeroshot/image/top1": 10.0 + score,
                "eval/zeroshot/image/top5": 30.0 + score, "eval/zeroshot/audio/top1": 5.0 + score,
                "eval/zeroshot/audio/top5": 20.0 + score, "eval/zeroshot/chance_top1": 100 / 30,
                "eval/retrieval/image_to_text/R@1": 2.5 + score, "eval/retrieval/image_to_text/R@10": 25.0 + score,
                "eval/retrieval/text_to_image/R@1": 5.0 + score, "eval/retrieval/text_to_image/R@10": 27.5 + score}

    rows = [evaluation(0, 0.0)]
    for step in range(1, max(steps) + 1):
        rows.append({"step": step, "loss": 9.0 - step, "samples_seen": 64 * step, "samples_per_s": 32.0})
        if step in steps:
            rows.append(evaluation(step, 7.25 * step))
            folder = root / "checkpoints" / f"step_{step:06d}"
            folder.mkdir(parents=True)
            torch.save({"module": {f"model.{k}": v for k, v in model.state_dict().items()}},
                       folder / "mp_rank_00_model_states.pt")
            (folder / MARKER).write_text(json.dumps({"step": step, "world_size": world_size, "zero_stage": 0,
                                                     "code_version": "0.1.0+gtest"}))
    (root / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_the_card_shows_the_exported_checkpoint_and_no_credential(tmp_path):
    secrets = ("AKIAKEY", "SECRETKEY", "SIGSECRET", "PASSWORD")
    train = ("s3://AKIAKEY:SECRETKEY@bucket/shards-{000000..000009}.tar::"
             "https://cdn.example.com/d-{0..1}.tar?X-Amz-Signature=SIGSECRET")
    rows = hand_made_run(tmp_path, train)
    evals = [row for row in rows if "eval/samples" in row]
    for step, expected in ((4, evals[2]), (2, evals[1])):  # the newest checkpoint, then an older one
        release = tmp_path / f"release{step}"
        assert cli(["export", str(tmp_path), f"step={step}", f"output.path={release}",
                    "release.description=Mirror at https://me:PASSWORD@example.com/model."]) == 0
        text = card(release)
        for secret in secrets:
            assert secret not in text and secret not in (release / "config.json").read_text(), secret
        assert "- Training data (2 datasets, 12 shards): `s3://bucket/shards-{000000..000009}.tar`, " \
               "`https://cdn.example.com/d-{0..1}.tar?<redacted>`" in text
        assert "Mirror at https://example.com/model." in text
        assert f"- Steps: {step} (of `run.steps=4`)" in text and f"- Samples seen: {64 * step}" in text
        assert f"global batch {32 * 2} samples" in text and "- Devices: 2 processes (CPU)" in text
        assert f"- Training time: {2 * step} s" in text  # 64 samples per step at 32 samples/s
        assert f"In-loop evaluation at step {step} on 40 held-out samples (`/data/held-out`)" in text
        for row in eval_rows(expected, untrained=evals[0]):
            assert row in text, row
        assert "| `masked_text` |" not in text and "| `masked_image` | 0.5 | mask ratio 0.75" in text
        assert "open_clip cannot load this model" in text and "local-dir:" not in text  # a conv stem


def test_a_release_saved_without_a_run_folder_has_a_card_written_before_its_config(tmp_path, monkeypatch):
    import shutil

    from pretrain import release as release_module
    from pretrain.release import save_release

    moved = []
    real_move = shutil.move
    monkeypatch.setattr(release_module.shutil, "move", lambda src, dst: moved.append(dst.name) or real_move(src, dst))
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    save_release(MultimodalModel(cfg).state_dict(), cfg, str(tmp_path / "release"), {}, templates=["a big {}."])
    assert moved[-2:] == ["README.md", "config.json"]  # config.json last: a folder with it is a whole release
    text = card(tmp_path / "release")
    assert "| Flavor | `tiny` |" in text and "`a big {}.`" in text and "| License | unspecified |" in text
    assert "- Data: not recorded" in text and "In-loop evaluation: not recorded" in text
    assert "| total | 2.06 M |" in text  # the tiny flavor with its masked-word heads tied to the token embedding
    assert f'create_model_and_transforms("local-dir:{tmp_path}/release")' in text


def test_a_conv_stem_card_says_open_clip_cannot_load_it(tmp_path):
    from pretrain.release import save_release

    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv"])
    save_release(MultimodalModel(cfg).state_dict(), cfg, str(tmp_path / "release"), {})
    text = card(tmp_path / "release")
    assert not (tmp_path / "release" / "open_clip_config.json").exists()
    assert "open_clip cannot load this model" in text and "`model.image.stem=conv`" in text
    assert "local-dir:" not in text and "conv stem" in text
    assert f"checkpoint={tmp_path}/release flavor=tiny" in text  # loading through mmfuse instead
