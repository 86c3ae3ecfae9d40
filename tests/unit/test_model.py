import pytest
import torch

from mmfuse.config import load_config
from pretrain.model import ModelConfig, MultimodalModel
from pretrain.model.towers import random_keep


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    return MultimodalModel(cfg).eval()


def test_towers_reduce_to_open_clip_without_masking(model):
    images = torch.randn(3, 3, 64, 64)
    text = torch.randint(1, 1000, (3, 32))
    text[:, 10] = 49407  # end of text: the argmax token
    with torch.no_grad():
        ours = model.project("image", model.encode_image(images).pooled)
        reference = torch.nn.functional.normalize(model.clip.encode_image(images), dim=-1)
        assert torch.allclose(ours, reference, atol=1e-5)
        ours_text = model.project("text", model.encode_text(text).pooled)
        reference_text = torch.nn.functional.normalize(model.clip.encode_text(text), dim=-1)
        assert torch.allclose(ours_text, reference_text, atol=1e-5)


def test_keep_drops_tokens_and_temperatures_are_1d(model):
    images = torch.randn(2, 3, 64, 64)
    keep = random_keep(2, 16, 0.25, torch.Generator().manual_seed(0))
    encoded = model.encode_image(images, keep)
    assert keep.shape == (2, 4) and encoded.tokens.shape == (2, 5, 64)
    assert (keep.diff(dim=1) > 0).all()
    assert model.logit_scale.shape == (1,)


def test_audio_tower_and_patch_layouts(model):
    mel = torch.randn(2, 64, 192)
    encoded = model.encode_audio(mel)
    assert encoded.tokens.shape == (2, 1 + 48, 64) and model.embed("audio", mel).shape == (2, 64)
    patches = model.audio_patches(mel)
    assert patches.shape == (2, 48, 256)
    assert torch.equal(patches[0, 1], mel[0, :16, 16:32].reshape(-1))  # patch 1: first mel band row, second time block
    images = torch.randn(1, 3, 64, 64)
    pix = model.image_patches(images)
    assert pix.shape == (1, 16, 3 * 256)
    assert torch.equal(pix[0, 5].reshape(16, 16, 3), images[0, :, 16:32, 16:32].permute(1, 2, 0))


def test_decoders_and_fusion_shapes(model):
    images, mel = torch.randn(2, 3, 64, 64), torch.randn(2, 64, 192)
    keep = random_keep(2, 16, 0.25)
    encoded = model.encode_image(images, keep)
    assert model.image_decoder(encoded.tokens, keep).shape == (2, 16, 768)
    text = model.encode_text(torch.randint(1, 100, (2, 32)), causal=False)
    fused = model.fusion(text.tokens, {"image": encoded.tokens, "audio": model.encode_audio(mel).tokens},
                         context_padding={"image": torch.tensor([[True] * 5, [False] * 5]),
                                          "audio": torch.ones(2, 49, dtype=torch.bool)})
    assert fused.shape == (2, 32, 64) and torch.isfinite(fused).all()


def test_bad_model_config_is_named():
    from mmfuse.config import ConfigError
    with pytest.raises(ConfigError, match="model.audio.n_mels"):
        load_config(ModelConfig, ["configs/model/tiny.yaml"], ["audio.frames=100"])


def _loss_and_grads(model, batch, trim_text=False):
    from pretrain.objectives import DistContext, Forward, ObjectivesConfig, build_objectives

    objectives = build_objectives(load_config(ObjectivesConfig, [], [
        "masked_image.weight=1", "masked_audio.weight=1", "masked_text.weight=1", "cross_modal_masked.weight=1"]))
    torch.manual_seed(3)  # the masking draws
    forward, losses = Forward(model, batch, trim_text), {}
    for objective in objectives:
        losses.update(objective(model, batch, forward, DistContext()))
    total = sum(losses.values())
    model.zero_grad()
    total.backward()
    return total.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_recomputes_the_blocks_and_changes_no_loss_or_gradient():
    from tests.unit.test_objectives import make_batch

    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    torch.manual_seed(0)
    plain = MultimodalModel(cfg)
    torch.manual_seed(0)
    checkpointed = MultimodalModel(cfg)
    checkpointed.set_grad_checkpointing(["image", "text", "audio"])
    # Pre-hooks count block calls: a non-reentrant recomputation stops early, before the last forward hook.
    calls = {"plain": [0, 0, 0], "checkpointed": [0, 0, 0]}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        for i, tower in enumerate(("image", "text", "audio")):
            model.tower_blocks(tower)[0].register_forward_pre_hook(lambda *_, n=name, i=i: calls[n].__setitem__(i, calls[n][i] + 1))
    batch = make_batch()
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    # Every block forward of a checkpointed tower runs again in backward.
    assert calls["checkpointed"] == [2 * n for n in calls["plain"]] and min(calls["plain"]) >= 1
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 50
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_compile_switch_wraps_only_the_named_towers_blocks():
    torch.manual_seed(0)
    model = MultimodalModel(load_config(ModelConfig, ["configs/model/tiny.yaml"]))
    names = set(model.state_dict())
    model.compile_towers(["image", "audio"])
    assert all(block._compiled_call_impl is not None for block in model.tower_blocks("image") + model.tower_blocks("audio"))
    assert all(block._compiled_call_impl is None for block in model.tower_blocks("text"))
    assert set(model.state_dict()) == names  # checkpoints and exports keep their parameter names


@pytest.mark.parametrize("override, key", [
    ("engine.gradient_checkpointing=[image,vision]", "engine.gradient_checkpointing"),
    ("engine.compile=[speech]", "engine.compile"),
    ("engine.compile_mode=fastest", "engine.compile_mode"),
])
def test_bad_tower_switches_are_named(override, key):
    from mmfuse.config import ConfigError
    from pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=key):
        load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"], ["run.dir=r", "data.train=d", override])
    with pytest.raises(ConfigError, match="engine.compile needs engine.zero_stage"):
        load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"], ["run.dir=r", "data.train=d", "engine.compile=[image]",
                                                                     "engine.zero_stage=3"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU rules")
def test_deepspeed_precision_on_cpu():
    from pretrain.config import PretrainConfig
    from pretrain.engine import deepspeed_config

    def config(precision):
        cfg = load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"], ["run.dir=r", "data.train=d",
                                                                          f"engine.precision={precision}"])
        return deepspeed_config(cfg, world_size=2)

    assert not config("auto")["bf16"]["enabled"] and not config("auto")["fp16"]["enabled"]  # fp32
    assert config("bf16")["bf16"]["enabled"] and not config("bf16")["fp16"]["enabled"]
    with pytest.raises(ValueError, match="engine.precision=fp16 needs a GPU"):
        config("fp16")


def test_reduction_buckets_fit_the_trainable_gradients_and_zero3_holds_a_1_over_n_share():
    from pretrain.config import PretrainConfig
    from pretrain.engine import deepspeed_config

    def zero(*overrides, n_params=6_798_817, world_size=2):
        cfg = load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"], ["run.dir=r", "data.train=d", *overrides])
        return deepspeed_config(cfg, world_size=world_size, n_params=n_params)["zero_optimization"]

    assert zero()["reduce_bucket_size"] == zero()["allgather_bucket_size"] == 6_798_848  # all, 64-aligned
    stage3 = zero("engine.zero_stage=3")
    assert stage3["reduce_bucket_size"] == stage3["stage3_prefetch_bucket_size"] == 3_399_424  # ceil(psi / 2)
    assert zero("engine.zero_stage=3", world_size=4)["reduce_bucket_size"] == 1_699_712
    # DeepSpeed's default caps a large model's bucket
    assert zero(n_params=2 * 10**9)["reduce_bucket_size"] == 5 * 10**8
    assert zero(n_params=1000)["reduce_bucket_size"] == 10**6


@pytest.mark.parametrize("objectives, tolerance", [
    (["contrastive.pairs.audio_text=0", "contrastive.pairs.image_audio=0"], 0.05),  # open_clip's image + text
    (["masked_image.weight=1", "masked_audio.weight=1", "masked_text.weight=1", "cross_modal_masked.weight=1"], 0.15),
    (["masked_image.weight=1", "masked_audio.weight=1", "masked_text.weight=1", "cross_modal_masked.weight=1",
      "masked_batch_fraction=0.5"], 0.15),  # the masked objectives' passes on half the batch
    (["masked_image.weight=0", "masked_audio.weight=0", "masked_text.weight=1", "cross_modal_masked.weight=1",
      "masked_batch_fraction=0.5"], 0.15),  # cross-modal reads its half of the whole batch's passes
    (["masked_image.weight=1", "masked_audio.weight=1", "masked_text.weight=1", "cross_modal_masked.weight=1",
      "cross_modal_masked.masked_context=true", "masked_batch_fraction=0.5"], 0.15),  # ... or the masked ones
])
def test_flops_estimate_agrees_with_torchs_flop_counter(objectives, tolerance):
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.flops import train_flops_per_sample
    from pretrain.objectives import DistContext, ObjectivesConfig, build_objectives
    from pretrain.step import PretrainStep

    cfg = load_config(ModelConfig, ["configs/model/small.yaml"])  # big enough that the blocks dominate, as at ViT-B
    objectives_cfg = load_config(ObjectivesConfig, [], objectives)
    torch.manual_seed(0)
    model, n = MultimodalModel(cfg), 4
    text = torch.zeros(n, cfg.text.context_length, dtype=torch.long)
    text[:, 0], text[:, 1:20], text[:, 20] = 49406, 5, 49407
    present = torch.ones(n, dtype=torch.bool)
    batch = {"image": torch.randn(n, 3, 128, 128), "text": text, "audio": torch.randn(n, 64, 512),
             "has_image": present, "has_text": present, "has_audio": present}
    objectives = build_objectives(objectives_cfg)
    step = PretrainStep(model, objectives, DistContext(), {}, masked_batch_fraction=objectives_cfg.masked_batch_fraction)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        step(batch)
    counted = counter.get_total_flops() / n
    assert counted == pytest.approx(train_flops_per_sample(cfg, objectives_cfg) / 3, rel=tolerance)


def test_peak_flops_by_device_name():
    from pretrain.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("Some Future GPU") is None


def test_trimmed_text_padding_changes_no_pooled_feature_loss_or_gradient():
    from pretrain.model.towers import trim_text_padding
    from tests.unit.test_objectives import make_batch

    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg)
    text = torch.zeros(4, 32, dtype=torch.long)
    for row, length in enumerate((3, 9, 5, 1)):  # captions of 1-9 tokens between start and end of text
        text[row, 0], text[row, 1:length + 1], text[row, length + 1] = 49406, torch.randint(1, 1000, (length,)), 49407
    trimmed = trim_text_padding(text)
    assert trimmed.shape == (4, 16) and torch.equal(trimmed, text[:, :16])  # last end of text at 10 -> 16 columns
    assert trim_text_padding(text, multiple=1).shape == (4, 11)
    full = text.clone()
    full[0, 1:31], full[0, 31] = 7, 49407  # a caption that fills the context: nothing to trim
    assert torch.equal(trim_text_padding(full), full)
    assert trim_text_padding(text[:0]).shape == (0, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed).pooled, model.encode_text(text).pooled, atol=1e-5)

    # Through the objectives: the causal pass trimmed, and the bidirectional (masked-token) passes, which mask the
    # padding out, trimmed too.
    batch = make_batch()
    loss, grads = _loss_and_grads(model, batch)
    loss_trimmed, grads_trimmed = _loss_and_grads(model, batch, trim_text=True)
    assert torch.allclose(loss, loss_trimmed, atol=1e-5)
    assert grads.keys() == grads_trimmed.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_trimmed[name], atol=1e-5), name


def test_the_bidirectional_text_pass_does_not_attend_to_padding():
    """BERT's attention mask: a caption's token features are the same after 8 or 24 more padding columns (without
    the mask, every padding position is one more key each token attends to)."""
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg)
    text = torch.zeros(3, 32, dtype=torch.long)
    for row, length in enumerate((3, 6, 2)):
        text[row, 0], text[row, 1:length + 1], text[row, length + 1] = 49406, torch.randint(1, 1000, (length,)), 49407
    with torch.no_grad():
        short, long = model.encode_text(text[:, :16], causal=False).tokens, model.encode_text(text, causal=False).tokens
    caption = (text[:, :16] != 0)
    assert torch.allclose(short[caption], long[:, :16][caption], atol=1e-5)


@pytest.mark.timeout(120)
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU backend's build")
def test_joining_the_process_group_builds_no_cpp_extension(tmp_path):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce here (minutes on a fresh machine)."""
    import subprocess
    import sys

    script = ("from pretrain.engine import init_distributed; import torch.distributed as dist; "
              "topo = init_distributed(); print('world', dist.get_world_size(), topo.rank)")
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0 and "world 1 0" in result.stdout, result.stderr[-2000:]
    built = list((tmp_path / "ext").rglob("*")) if (tmp_path / "ext").exists() else []
    assert not any("shm_comm" in path.name for path in built), built


@pytest.mark.parametrize("patch_size", [8, 16])
def test_the_conv_stem_ends_at_the_patch_grid_and_dropped_patches_stay_unseen(patch_size):
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv", f"image.patch_size={patch_size}"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg).eval()
    images, grid = torch.randn(2, 3, 64, 64), (64 // patch_size) ** 2
    with torch.no_grad():
        assert model.encode_image(images).tokens.shape == (2, 1 + grid, 64)
        # open_clip's own forward runs the same stem (its VisionTransformer calls visual.conv1).
        reference = torch.nn.functional.normalize(model.clip.encode_image(images), dim=-1)
        torch.testing.assert_close(model.embed("image", images), reference)
        # 3x3 convolutions see across patch borders: the kept tokens must not change when dropped pixels do.
        keep = random_keep(2, grid, 0.25, torch.Generator().manual_seed(1))
        dropped = torch.ones(2, grid, dtype=torch.bool).scatter_(1, keep, False)
        mask = dropped.view(2, 1, 64 // patch_size, 64 // patch_size)
        mask = mask.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
        changed = torch.where(mask, torch.randn_like(images) * 5, images)
        torch.testing.assert_close(model.encode_image(changed, keep).tokens, model.encode_image(images, keep).tokens)
        assert not torch.allclose(model.encode_image(changed).tokens, model.encode_image(images).tokens)


def test_a_conv_stem_needs_a_power_of_two_patch_and_has_no_open_clip_files(tmp_path):
    from mmfuse.config import ConfigError
    from pretrain.release import load_release, save_release

    with pytest.raises(ConfigError, match="model.image.stem must be one of"):
        load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=resnet"])
    with pytest.raises(ConfigError, match="power-of-two model.image.patch_size"):
        load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv", "image.patch_size=12",
                                                               "image.image_size=72"])
    patch = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    save_release(MultimodalModel(patch).state_dict(), patch, str(tmp_path / "release"), {})
    assert (tmp_path / "release" / "open_clip_model.safetensors").is_file()
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv"])
    original = MultimodalModel(cfg)
    save_release(original.state_dict(), cfg, str(tmp_path / "release"), {})  # over the patch-stem release
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded, release = load_release(str(tmp_path / "release"))
    assert release["model"]["image"]["stem"] == "conv"
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_flops_count_the_conv_stem():
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.flops import conv_stem_flops

    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv"])
    stem = MultimodalModel(cfg).clip.visual.conv1
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        stem(torch.randn(1, 3, 64, 64))
    assert counter.get_total_flops() == pytest.approx(conv_stem_flops(cfg.image), rel=0.01)


def test_tied_word_heads_score_words_against_the_token_embedding():
    """model.tie_word_embeddings (the default): the masked-word heads own no vocabulary matrix; their logits are
    dot products with the text tower's token embedding (through a projection where the fusion is wider than the
    text tower, as in the tiny flavor), which they read but do not train."""
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    tied = MultimodalModel(cfg)
    untied = MultimodalModel(load_config(ModelConfig, ["configs/model/tiny.yaml"], ["tie_word_embeddings=false"]))
    vocab, text, fusion = cfg.text.vocab_size, cfg.text.width, cfg.fusion.width
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == vocab * (text + fusion) - fusion * text - text  # two matrices less, one projection more
    assert tied.text_mlm_head.proj is None and tied.mlm_head.proj.weight.shape == (text, fusion)
    embedding = tied.clip.token_embedding.weight
    hidden = torch.randn(5, text)
    assert torch.allclose(tied.word_logits("text_mlm_head", hidden), hidden @ embedding.T + tied.text_mlm_head.bias)
    tied.word_logits("mlm_head", torch.randn(3, fusion)).logsumexp(-1).sum().backward()
    assert embedding.grad is None
    assert tied.mlm_head.proj.weight.grad.abs().sum() > 0 and tied.mlm_head.bias.grad.abs().sum() > 0
    assert untied.word_logits("mlm_head", torch.randn(3, fusion)).shape == (3, vocab)
    assert any(p is embedding for p in tied.loose_parameters())  # ZeRO-3 gathers it for the heads, outside its module's forward


def test_a_release_from_before_tied_word_heads_loads_untied(tmp_path):
    import json

    from pretrain.release import load_release, save_release

    torch.manual_seed(0)
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["tie_word_embeddings=false"])
    old = MultimodalModel(cfg)
    save_release(old.state_dict(), cfg, str(tmp_path), {"test": "untied"})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["tie_word_embeddings"]  # what releases written before the option hold
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_release(str(tmp_path))
    assert not loaded.cfg.tie_word_embeddings
    assert torch.equal(loaded.mlm_head.weight, old.mlm_head.weight)
