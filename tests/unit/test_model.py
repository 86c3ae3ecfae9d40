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
