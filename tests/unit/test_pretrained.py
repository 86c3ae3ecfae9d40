"""Loading open_clip checkpoints made by open_clip's own code, saved the ways its releases and trainer save them."""

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmfuse.config import load_config
from pretrain.model import ModelConfig, MultimodalModel
from pretrain.model.pretrained import load_open_clip_weights, model_config_for_open_clip
from pretrain.model.towers import open_clip_config


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"])
    torch.manual_seed(3)
    reference = open_clip.CLIP(**open_clip_config(cfg))  # open_clip's own model, own init
    return cfg, reference


def check_same_embeddings(cfg, reference, path):
    model = MultimodalModel(cfg).eval()
    load_open_clip_weights(model.clip, str(path))
    images, text = torch.randn(2, 3, 64, 64), open_clip.tokenizer.SimpleTokenizer(context_length=32)(["a cat", "a dog"])
    reference.eval()
    with torch.no_grad():
        assert torch.allclose(model.embed("image", images), torch.nn.functional.normalize(reference.encode_image(images), dim=-1), atol=1e-6)
        assert torch.allclose(model.embed("text", text), torch.nn.functional.normalize(reference.encode_text(text), dim=-1), atol=1e-6)
    assert torch.allclose(model.logit_scale, reference.logit_scale.reshape(1))


def test_release_safetensors(setup, tmp_path):
    cfg, reference = setup
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    check_same_embeddings(cfg, reference, tmp_path / "open_clip_model.safetensors")


def test_release_bin_and_trainer_checkpoint(setup, tmp_path):
    cfg, reference = setup
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    check_same_embeddings(cfg, reference, tmp_path / "open_clip_pytorch_model.bin")
    trainer = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
               "optimizer": {"state": {}, "param_groups": []}}
    torch.save(trainer, tmp_path / "epoch_3.pt")
    check_same_embeddings(cfg, reference, tmp_path / "epoch_3.pt")


def test_unsafe_pickle_is_refused(setup, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    model = MultimodalModel(setup[0])
    with pytest.raises(ValueError, match="weights_only"):
        load_open_clip_weights(model.clip, str(tmp_path / "evil.pt"))


def test_mismatched_architecture_is_named(setup, tmp_path):
    cfg, _ = setup
    other = open_clip.CLIP(**open_clip_config(load_config(ModelConfig, ["configs/model/tiny.yaml"], ["embed_dim=32"])))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="text_projection|visual.proj"):
        load_open_clip_weights(MultimodalModel(cfg).clip, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        load_open_clip_weights(MultimodalModel(cfg).clip, str(tmp_path / "nope.safetensors"))
    save_file({k: v.contiguous() for k, v in setup[1].state_dict().items()}, tmp_path / "patch.safetensors")
    conv = MultimodalModel(load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.stem=conv"]))
    with pytest.raises(ValueError, match="set model.image.stem=patch to load it"):
        load_open_clip_weights(conv.clip, str(tmp_path / "patch.safetensors"))


def test_lock_freezes_exactly_one_tower(setup):
    model = MultimodalModel(setup[0])
    image = {id(p) for p in model.tower_parameters("image")}
    text = {id(p) for p in model.tower_parameters("text")}
    audio = {id(p) for p in model.tower_parameters("audio")}
    assert image and text and audio and not (image & text) and not (text & audio)
    assert id(model.clip.logit_scale) not in text and id(model.clip.token_embedding.weight) in text


@pytest.mark.parametrize("flavor, quick_gelu", [("vit-b-16", False), ("vit-b-16", True), ("vit-l-14", False)])
def test_named_flavors_are_the_open_clip_architecture_they_name(flavor, quick_gelu):
    """Same parameter names and shapes as open_clip's model (so its released weights load), and the same
    activation: OpenAI's weights need QuickGELU (open_clip's -quickgelu models)."""
    from pretrain.model.towers import build_clip

    cfg = load_config(ModelConfig, [f"configs/model/{flavor}.yaml"], [f"quick_gelu={quick_gelu}"])
    name = cfg.open_clip_name + ("-quickgelu" if quick_gelu else "")
    with torch.device("meta"):  # shapes only: no memory for ViT-L's 400 M parameters
        ours, reference = build_clip(cfg), open_clip.CLIP(**open_clip.get_model_config(name))
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    expected["logit_scale"] = (1,)  # held as shape [1] for DeepSpeed; the open_clip export squeezes it
    assert shapes == expected
    activation = type(ours.visual.transformer.resblocks[0].mlp.gelu)
    assert activation is type(reference.visual.transformer.resblocks[0].mlp.gelu)
    assert (activation.__name__ == "QuickGELU") is quick_gelu
    assert type(ours.transformer.resblocks[0].mlp.gelu) is activation


def test_an_average_pooled_image_tower_embeds_as_open_clip_does(tmp_path):
    cfg = load_config(ModelConfig, ["configs/model/tiny.yaml"], ["image.pool_type=avg"])
    torch.manual_seed(4)
    reference = open_clip.CLIP(**open_clip_config(cfg))
    assert reference.visual.pool_type == "avg"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    check_same_embeddings(cfg, reference, tmp_path / "open_clip_model.safetensors")
    # The architecture read back from open_clip's config keeps the pooling.
    (tmp_path / "avg.json").write_text(__import__("json").dumps(open_clip_config(cfg)))
    assert model_config_for_open_clip(str(tmp_path / "avg.json")).image.pool_type == "avg"
