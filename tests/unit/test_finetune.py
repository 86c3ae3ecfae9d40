"""Fine-tuning building blocks: checkpoint loading (our releases and open_clip's own files, safely), the standard
data formats, per-rank batch plans, retrieval recall with several captions, layer-wise lr decay, fusion heads."""

import json
import pickle

import pytest
import torch

from data_pipeline.config import AudioFeatureConfig
from finetune.checkpoint import check_checkpoint, load_checkpoint
from pretrain.model.pretrained import model_config_for_open_clip
from finetune.config import FinetuneConfig
from finetune.data import BatchPlan, detect_format, read_records
from finetune.tasks.retrieval import recall_at_k
from finetune.trainer import layer_scale, lr_schedule
from mmfuse.config import CONFIG_ROOT, ConfigError, load_config
from pretrain.model import ModelConfig, MultimodalModel
from pretrain.model.towers import open_clip_config


def config(**values) -> FinetuneConfig:
    cfg = load_config(FinetuneConfig, overrides=[f"{k}={v}" for k, v in
                                                 {"task": "zeroshot", "checkpoint": "c", "data.eval": "x", "run.dir": "r",
                                                  **values}.items()])
    return cfg


@pytest.fixture(scope="module")
def tiny():
    return load_config(ModelConfig, [str(CONFIG_ROOT / "model" / "tiny.yaml")])


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory, tiny):
    """A tiny CLIP created and saved by open_clip's own code: release-style safetensors, a trainer checkpoint
    (``module.`` prefixes), and its model config JSON."""
    import open_clip
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("open-clip")
    (root / "tiny-clip.json").write_text(json.dumps(open_clip_config(tiny)))
    open_clip.add_model_config(root / "tiny-clip.json")
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-clip")
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, root / "open_clip_model.safetensors")
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}},
               root / "epoch_3.pt")
    return root, model


@pytest.mark.parametrize("file", ["open_clip_model.safetensors", "epoch_3.pt"])
def test_open_clip_checkpoint_made_by_open_clip_loads_with_identical_embeddings(open_clip_files, file):
    root, reference = open_clip_files
    cfg = config(checkpoint=str(root / file), open_clip_model=str(root / "tiny-clip.json"))
    model, info = load_checkpoint(cfg)
    assert info.kind == "open_clip" and len(info.sha256) == 64
    reference.eval()
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    text = torch.randint(1, 1000, (2, 32))
    with torch.no_grad():
        expected_image = torch.nn.functional.normalize(reference.encode_image(images), dim=-1)
        expected_text = torch.nn.functional.normalize(reference.encode_text(text), dim=-1)
        torch.testing.assert_close(model.embed("image", images), expected_image)
        torch.testing.assert_close(model.embed("text", text), expected_text)


def test_our_release_loads_and_refuses_a_mismatched_flavor(tmp_path, tiny):
    from pretrain.release import save_release

    torch.manual_seed(0)
    original = MultimodalModel(tiny)
    save_release(original.state_dict(), tiny, str(tmp_path / "release"), {}, templates=["a big {}."])
    model, info = load_checkpoint(config(checkpoint=str(tmp_path / "release"), flavor="tiny"))
    assert info.kind == "release" and info.flavor == "tiny"
    assert info.templates == ["a big {}."]  # the prompts it was evaluated with travel in the release
    for name, value in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="'tiny' model, but flavor='small'"):
        check_checkpoint(config(checkpoint=str(tmp_path / "release"), flavor="small"))


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path, open_clip_files):
    root, _ = open_clip_files
    with pytest.raises(ValueError, match="does not exist"):
        check_checkpoint(config(checkpoint=str(tmp_path / "nothing.pt")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is not a release folder \\(no config.json\\)"):
        check_checkpoint(config(checkpoint=str(tmp_path / "folder")))
    with pytest.raises(ConfigError, match="set open_clip_model"):
        check_checkpoint(config(checkpoint=str(root / "epoch_3.pt")))
    with pytest.raises(ConfigError, match="not an open_clip model name"):
        check_checkpoint(config(checkpoint=str(root / "epoch_3.pt"), open_clip_model="ViT-Nope-99"))
    # Weights of one architecture with the config of another: the mismatch names the parameter.
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(config(checkpoint=str(root / "open_clip_model.safetensors"), open_clip_model="ViT-B-32"))
    # A pickle that holds anything but tensors is never unpickled.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": {"x": Exploit()}}))
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(config(checkpoint=str(evil), open_clip_model=str(root / "tiny-clip.json")))


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_open_clip_architecture_maps_onto_our_towers():
    cfg = model_config_for_open_clip("ViT-B-16")
    assert (cfg.image.width, cfg.image.layers, cfg.image.heads, cfg.image.patch_size) == (768, 12, 12, 16)
    assert (cfg.text.width, cfg.text.layers, cfg.embed_dim, cfg.open_clip_name) == (512, 12, 512, "ViT-B-16")
    assert cfg.audio.width == 768  # a new audio tower mirrors the image tower


@pytest.fixture(scope="module")
def synth_world(tmp_path_factory):
    from mmfuse.cli import main as cli

    root = tmp_path_factory.mktemp("synth")
    assert cli(["synth", f"output.path={root}", "num_samples=7", "image_size=32", "seed=2"]) == 0
    return root


def test_standard_formats_read_the_same_samples(synth_world):
    root = synth_world
    coco = read_records(str(root / "coco_captions.json"), detect_format(str(root / "coco_captions.json"), "auto"))
    assert len(coco) == 7 and all(len(r.meta["captions"]) == 5 and r.image.endswith(".jpg") for r in coco)
    assert detect_format(str(root / "vqa_questions.json"), "auto") == "vqa"
    vqa = read_records(str(root / "vqa_questions.json"), "vqa", annotations=str(root / "vqa_annotations.json"))
    assert [len(r.meta["answers"]) for r in vqa] == [10] * 7 and all(r.meta["question"] for r in vqa)
    with pytest.raises(ValueError, match="annotations JSON"):
        read_records(str(root / "vqa_questions.json"), "vqa")
    folder = read_records(str(root / "classes"), detect_format(str(root / "classes"), "auto"))
    names = sorted({r.meta["label_name"] for r in folder})
    assert len(folder) == 7 and all(names[r.meta["label"]] == r.meta["label_name"] for r in folder)
    manifest = read_records(str(root / "manifest.parquet"), "manifest")
    assert len(manifest) == 7 and all(r.audio and r.audio.endswith(".flac") and r.text for r in manifest)
    assert {r.meta["question_id"] for r in manifest} == {r.meta["question_id"] for r in vqa}


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 4, 3), (16, 4, 2)])
def test_batch_plan_equal_batches_per_rank_and_eval_covers_each_sample_once(n, batch, world):
    train = [BatchPlan(n, batch, rank, world, seed=0, train=True) for rank in range(world)]
    counts = {len(list(plan)) for plan in train}
    assert len(counts) == 1  # no rank waits for another
    seen = {i for plan in train for b in plan for (_, _, i) in b}
    assert seen == set(range(n))
    plan = train[0]
    first = list(plan)
    plan.epoch = 1
    assert list(plan) != first  # another order each epoch
    evaluation = [BatchPlan(n, batch, rank, world, seed=0, train=False) for rank in range(world)]
    keys = [i for plan in evaluation for b in plan for (_, _, i) in b]
    assert sorted(keys) == list(range(n))


def test_recall_with_several_captions_per_image():
    # 2 images; captions 0,1 belong to image 0 and captions 2,3 to image 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    captions = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.7, 0.3]])
    to_text = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    # image 0: best caption is 0 (its own) → hit at 1; image 1: best own caption 2 (0.9) → rank 0.
    assert recall_at_k(images, captions, to_text, ks=(1,)) == {"R@1": 100.0}
    owner = [torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([1])]
    # caption 1 prefers image 1 (0.8 > 0.2) and caption 3 prefers image 0: 2 of 4 hit at 1, all at 2.
    assert recall_at_k(captions, images, owner, ks=(1, 2), chunk=3) == {"R@1": 50.0, "R@2": 100.0}


def test_layer_decay_and_schedule(tiny):
    assert layer_scale("backbone.clip.visual.transformer.resblocks.1.attn.in_proj_weight", tiny, 0.5) == 1.0 * 0.5 ** 1
    assert layer_scale("backbone.clip.visual.conv1.weight", tiny, 0.5) == 0.5 ** 3
    assert layer_scale("backbone.clip.visual.proj", tiny, 0.5) == 1.0
    assert layer_scale("backbone.clip.token_embedding.weight", tiny, 0.5) == 0.5 ** 3
    assert layer_scale("backbone.audio.vit.blocks.0.mlp.fc1.weight", tiny, 0.5) == 0.5 ** 2
    assert layer_scale("backbone.fusion.query_in.weight", tiny, 0.5) == 1.0
    cfg = config(**{"optim.warmup_steps": 4, "run.steps": 20, "optim.min_lr_ratio": 0.1})
    from pretrain.config import PretrainConfig
    from pretrain.engine import lr_lambda

    engine_cfg = load_config(PretrainConfig, [], ["run.dir=x", "data.train=x", "optim.warmup_steps=4", "run.steps=20",
                                                  "optim.min_lr_ratio=0.1"])
    schedule = lr_lambda(engine_cfg.optim, engine_cfg.run.steps)
    factors = [schedule(s) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0 and 0.1 < factors[-1] < 0.12
    # Fine-tuning follows the same schedule (pretrain/optim.py): one rule for both stages.
    task = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    scheduler = lr_schedule(optimizer, cfg)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(factors)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="classify.fusion"):
        config(**{"classify.fusion": "mid"})
    with pytest.raises(ConfigError, match="retrieval.pairs"):
        config(**{"retrieval.pairs": "[image_smell]"})
    with pytest.raises(ConfigError, match="zeroshot.wise_ft"):
        config(**{"zeroshot.wise_ft": 1.5})
    with pytest.raises(ConfigError, match="vqa.read"):
        config(**{"vqa.read": "cls"})


class _Data:
    def __init__(self, metas):
        self._metas = metas

    def metas(self):
        return self._metas


@pytest.mark.parametrize("fusion", ["early", "late", "hybrid", "cross_attention"])
def test_every_fusion_classifies_with_any_modality_missing(tiny, fusion):
    import open_clip

    from finetune.tasks import TaskContext, build_task

    torch.manual_seed(0)
    cfg = config(task="classify", **{"classify.fusion": fusion, "classify.modality_dropout": 0.5})
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=tiny.text.context_length)
    metas = [{"label": i % 4, "label_name": f"c{i % 4}"} for i in range(8)]
    task = build_task(cfg, MultimodalModel(tiny), TaskContext(tokenizer, _Data(metas), _Data(metas)))
    task.freeze_unused()
    b = 6
    batch = {"__key__": [str(i) for i in range(b)], "label": torch.tensor([0, 1, 2, 3, 0, -1]),
             "image": torch.randn(b, 3, 64, 64), "audio": torch.randn(b, 64, 192) - 8,
             "text": tokenizer([f"caption {i}" for i in range(b)]),
             "has_image": torch.tensor([1, 1, 0, 0, 1, 1], dtype=torch.bool),
             "has_text": torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool),
             "has_audio": torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.bool)}
    loss = task(batch)
    loss.backward()
    assert torch.isfinite(loss)
    heads = [p for p in task.head_parameters() if p.grad is not None]
    assert heads and all(torch.isfinite(p.grad).all() for p in heads)
    records = task.predict(batch)
    assert [r["label"] for r in records] == [0, 1, 2, 3, 0, -1]
    assert all(0 <= r["prediction"] < 4 for r in records)
    # Removing audio leaves sample 3 (audio only) with nothing: it is not scored rather than guessed.
    assert records[3]["without_audio"] == -1 and records[0]["without_audio"] >= 0
    dropped = task.drop_modalities(task.present(batch))
    assert torch.stack(list(dropped.values())).any(0).all()  # never every modality of a sample


@pytest.mark.parametrize("fusion", ["early", "late", "hybrid", "cross_attention"])
def test_classify_tells_ddp_whether_a_step_can_skip_a_trainable_parameter(tiny, fusion):
    """find_unused_parameters follows may_skip_parameters: False must mean every trainable parameter gets a gradient
    from any batch (else DDP's reduction hangs), True that some batch leaves one out (else it only costs)."""
    import open_clip

    from finetune.tasks import TaskContext, build_task

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=tiny.text.context_length)
    metas = [{"label": i % 4, "label_name": f"c{i % 4}"} for i in range(8)]
    b = 4
    no_audio = {"__key__": [str(i) for i in range(b)], "label": torch.tensor([0, 1, 2, 3]),
                "image": torch.randn(b, 3, 64, 64), "audio": torch.zeros(b, 64, 192),
                "text": tokenizer([f"caption {i}" for i in range(b)]), "has_image": torch.ones(b, dtype=torch.bool),
                "has_text": torch.ones(b, dtype=torch.bool), "has_audio": torch.zeros(b, dtype=torch.bool)}
    cases = [("[image,text,audio]", "[image,text,audio]", False), ("[]", "[image,text,audio]", True)]
    if fusion == "cross_attention":  # the fusion encoder trains; its audio input goes unread when audio is not classified
        cases.append(("[image,text,audio]", "[image,text]", True))
    for freeze, modalities, skips in cases:
        torch.manual_seed(0)
        cfg = config(task="classify", freeze=freeze, **{"classify.fusion": fusion, "classify.modalities": modalities})
        task = build_task(cfg, MultimodalModel(tiny), TaskContext(tokenizer, _Data(metas), _Data(metas)))
        task.freeze_unused()
        assert task.may_skip_parameters() is skips, (freeze, modalities)
        task(no_audio).backward()  # a rank whose batch has no audio at all
        without_gradient = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
        assert bool(without_gradient) is skips, (freeze, modalities, without_gradient)


@pytest.mark.integration
def test_release_on_object_storage_loads(tmp_path, tiny, s3_server):
    from pretrain.release import save_release

    torch.manual_seed(0)
    original = MultimodalModel(tiny)
    url = f"{s3_server['url']}/releases/tiny"
    save_release(original.state_dict(), tiny, url, {})
    model, info = load_checkpoint(config(checkpoint=url))
    assert info.kind == "release" and len(info.sha256) == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.state_dict().items())
    with pytest.raises(ValueError, match="does not exist"):
        check_checkpoint(config(checkpoint=f"{s3_server['url']}/releases/missing.safetensors"))


def test_classnames_from_a_file_or_the_data(tmp_path):
    from finetune.tasks.zeroshot import load_classnames

    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    (tmp_path / "names.json").write_text('["cat", "dog", "eel"]')
    assert load_classnames([], str(tmp_path / "names.txt"), []) == ["cat", "dog"]
    assert load_classnames([], str(tmp_path / "names.json"), []) == ["cat", "dog", "eel"]
    assert load_classnames(["a"], str(tmp_path / "names.txt"), []) == ["a"]
    metas = [{"label": 2, "label_name": "eel"}, {"label": 0, "label_name": "cat"}]
    assert load_classnames([], "", metas) == ["cat", "class 1", "eel"]
    with pytest.raises(ConfigError, match="needs class names"):
        load_classnames([], "", [{"label": 1}])


def test_record_batches_from_workers_keep_their_values_while_held(synth_world):
    from finetune.data import TaskData

    path = synth_world / "coco_captions.json"
    cfg = config(task="caption", **{"data.train": path, "data.batch_size": 1, "data.workers": 2})

    def batches():
        return TaskData(cfg, "train", 0, 1, None, None, image_size=32, audio=AudioFeatureConfig(n_mels=8, frames=10))

    copies = [{k: v.clone() for k, v in b.items() if isinstance(v, torch.Tensor)} for b in batches()]
    held = list(batches())  # batch memory comes from the workers' rings: none may be written while held
    assert len(held) == len(copies) == 7 and "_ring" not in held[0]
    for batch, copy in zip(held, copies, strict=True):
        assert copy.keys() <= batch.keys() and all(torch.equal(batch[k], copy[k]) for k in copy)
    assert held[0]["image"].shape == (1, 3, 32, 32) and held[0]["image"].float().std() > 0


@pytest.mark.parametrize("read", ["mask", "eot"])
def test_vqa_reads_the_end_of_text_slot_as_a_masked_word_or_as_it_is(tiny, read):
    """vqa.read=mask gives the question's end-of-text slot pre-training's mask embedding (the answer depends on it);
    vqa.read=eot reads the end-of-text token as it is (the mask embedding changes nothing)."""
    import open_clip

    from finetune.tasks import TaskContext, build_task

    torch.manual_seed(0)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=tiny.text.context_length)
    metas = [{"question": "what color is the circle?", "answers": [a] * 10} for a in ("red", "blue", "green")]
    task = build_task(config(task="vqa", **{"vqa.read": read}), MultimodalModel(tiny),
                      TaskContext(tokenizer, _Data(metas), _Data(metas)))
    task.eval()
    images = torch.randn(2, 3, 64, 64)
    questions = ["what color is the circle?", "how many shapes are there?"]
    with torch.no_grad():
        before = task.logits(images, questions)
        # A random direction: a constant added to every feature would vanish in the text tower's layer norms.
        task.backbone.text_mask_embedding.add_(torch.randn_like(task.backbone.text_mask_embedding))
        after = task.logits(images, questions)
    assert before.shape == (2, 3) and torch.isfinite(before).all()
    assert torch.allclose(before, after) is (read == "eot")
