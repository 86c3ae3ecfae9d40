"""The decoder's image path: a batch is each sample through the model's transform, missing images zero."""

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_pipeline.config import LoaderConfig
from data_pipeline.loader.decode import Decoder
from data_pipeline.errors import SampleError
from data_pipeline.loader.tarstream import RawSample
from tests.datagen import animated_gif, bomb_png, palette_with_transparency, rotated_jpeg

pytestmark = pytest.mark.timeout(60)


def jpeg(seed: int, size=(300, 256), mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG")
    return out.getvalue()


def batch_of(decoder: Decoder, images: list[bytes | None], seed: int = 7) -> torch.Tensor:
    samples = []
    for i, data in enumerate(images):
        sample = {"__key__": str(i), "meta": {}, "text": "a caption"}
        if data is not None:
            torch.manual_seed(seed + i)
            sample["image"] = decoder.decode_image(data)
        samples.append(sample)
    return decoder.collate(samples)["image"]


def reference(transform, images: list[bytes | None], seed: int = 7) -> torch.Tensor:
    rows = []
    for i, data in enumerate(images):
        if data is None:
            rows.append(torch.zeros(3, 64, 64))
            continue
        torch.manual_seed(seed + i)
        rows.append(transform(Image.open(io.BytesIO(data)).convert("RGB")))
    return torch.stack(rows)


@pytest.mark.parametrize("is_train", [True, False])
def test_open_clip_transform_batches_are_bit_identical_to_applying_it(is_train):
    transform = open_clip.image_transform(64, is_train=is_train)
    decoder = Decoder(LoaderConfig(train="unused"), transform, None, 64)
    images = [jpeg(0), None, jpeg(1, (64, 64)), jpeg(2, (500, 120)), jpeg(3, mode="L")]
    assert decoder.decode_image(images[0]).dtype == torch.uint8  # ToTensor + Normalize left to the batch
    assert torch.equal(batch_of(decoder, images), reference(transform, images))


def test_batch_normalize_mixes_uint8_float_and_missing_images():
    from data_pipeline.loader.decode import split_tensor_tail

    transform = open_clip.image_transform(64, is_train=False)
    head, normalize = split_tensor_tail(transform)
    pictures = [head(Image.open(io.BytesIO(jpeg(i))).convert("RGB")) for i in range(3)]
    as_uint8 = lambda picture: torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    images = [as_uint8(pictures[0]), normalize.tail(pictures[1]), None, as_uint8(pictures[2])]
    want = torch.stack([transform.transforms[-1](transform.transforms[-2](p)) for p in pictures])
    got = normalize.collate(images, (3, 64, 64))
    assert torch.equal(got[[0, 1, 3]], want) and torch.equal(got[2], torch.zeros(3, 64, 64))
    # Anything but a Compose ending in ToTensor + Normalize runs whole, per sample.
    for other in (None, transform.transforms[0], type(transform)(transform.transforms[:-1])):
        assert split_tensor_tail(other) == (other, None)


def test_jpegs_decode_through_turbojpeg_with_pillows_pixels_and_failure_reasons(monkeypatch):
    import data_pipeline.loader.decode as decode
    from data_pipeline.errors import SampleError

    fast = []
    real = decode.decode_jpeg_fast
    monkeypatch.setattr(decode, "decode_jpeg_fast", lambda data, shrunk: fast.append(data) or real(data, shrunk))
    decoder = Decoder(LoaderConfig(train="unused"), None, None, 64)  # no transform: the decoded uint8 pixels
    images = [jpeg(0), jpeg(3, mode="L"), jpeg(4, mode="CMYK")]
    for data in images:
        want = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(decoder.decode_image(data), want)
    assert fast == images[:2]  # RGB and greyscale through TurboJPEG; CMYK through Pillow
    truncated = jpeg(5)[: len(jpeg(5)) // 2]
    with pytest.raises(SampleError) as failed:
        decoder.decode_image(truncated)
    assert failed.value.reason == "image_decode_error" and fast[-1] == truncated  # refused there, judged by Pillow


@pytest.mark.parametrize("is_train", [True, False])
def test_a_modality_no_sample_has_is_made_on_the_device_as_the_zeros_the_decoder_would_send(is_train):
    """The trainer does not copy an all-missing modality (an image-text run's empty audio batch, a text-only batch's
    images): it makes zeros of the target dtype on the device. That holds only while the decoder zero-fills missing
    rows, which is checked here through the open_clip transforms' batched normalisation."""
    from pretrain.step import batch_to_device

    decoder = Decoder(LoaderConfig(train="unused"), open_clip.image_transform(64, is_train=is_train), None, 64)
    with_images = [{"__key__": str(i), "meta": {}, "text": "a caption", "image": decoder.decode_image(jpeg(i))}
                   for i in range(3)]
    text_only = [{"__key__": str(i), "meta": {}, "text": "a caption"} for i in range(3)]
    for samples, absent in ((with_images, ("audio", "audio_mask")), (text_only, ("image", "audio", "audio_mask"))):
        batch = decoder.collate(samples)
        assert all(not batch[f"has_{key.split('_')[0]}"].any() for key in absent)
        moved = batch_to_device(batch, torch.device("cpu"), torch.bfloat16)
        for key in ("audio", "audio_mask", "image"):
            assert moved[key].dtype == (torch.bool if key == "audio_mask" else torch.bfloat16)
            assert torch.equal(moved[key], batch[key].to(moved[key].dtype)), key


def _reason(decoder: Decoder, members: dict[str, bytes]) -> str:
    with pytest.raises(SampleError) as err:
        decoder(RawSample("k", members))
    return err.value.reason


def test_nasty_members_fail_alone_with_their_reason_and_odd_ones_are_converted():
    """Issue 20, the loader's side: shards made elsewhere hold whatever their writer stored."""
    decoder = Decoder(LoaderConfig(train="x"), None, None)
    png = io.BytesIO()
    Image.new("RGB", (468, 1)).save(png, "PNG")
    assert _reason(decoder, {"jpg": png.getvalue()}) == "bad_aspect_ratio"  # Resize(224) would make 104832x224
    assert _reason(decoder, {"jpg": bomb_png(80_000_000, 1)}) == "bad_aspect_ratio"
    assert _reason(decoder, {"jpg": bomb_png()}) == "image_too_large"  # Pillow's own bomb error, named as such
    assert _reason(decoder, {"txt": b"x", "json": b"[" * 100_000}) == "bad_json"  # RecursionError, not a crash
    sample = decoder(RawSample("k", {"jpg": rotated_jpeg(), "txt": b"\x00a \x1b[1mkite\x07\x00"}))
    assert sample["text"] == "a [1mkite" and tuple(sample["image"].shape) == (3, 240, 120)  # EXIF 6: upright
    for odd in (palette_with_transparency(), animated_gif()):
        assert decoder(RawSample("k", {"png": odd}))["image"].shape[0] == 3


def test_training_draws_one_of_a_samples_alternative_captions_and_evaluation_reads_the_caption_member():
    import json

    from data_pipeline.config import MembersConfig

    meta = {"captions": ["a red circle", "a photo of a red circle", "", 7, "a red circle\x00", "one shape: a red circle"]}
    members = {"txt": b"a red circle", "json": json.dumps(meta).encode()}
    train = Decoder(LoaderConfig(train="x"), None, None)

    def drawn(decoder, seed):
        torch.default_generator.manual_seed(seed)  # what the loader seeds per (seed, epoch, sample)
        return decoder(RawSample("k", members))["text"]

    seen = [drawn(train, seed) for seed in range(60)]
    # The caption member and the distinct non-empty strings (control characters stripped), each drawn.
    assert set(seen) == {"a red circle", "a photo of a red circle", "one shape: a red circle"}
    assert seen == [drawn(train, seed) for seed in range(60)]  # a pure function of the seed: exact resume
    evaluation = Decoder(LoaderConfig(train="x"), None, None, train=False)
    assert {drawn(evaluation, seed) for seed in range(20)} == {"a red circle"}
    off = Decoder(LoaderConfig(train="x", members=MembersConfig(text_choices_json_field="")), None, None)
    assert {drawn(off, seed) for seed in range(20)} == {"a red circle"}
    members["json"] = json.dumps({"captions": "not a list"}).encode()
    assert {drawn(train, seed) for seed in range(20)} == {"a red circle"}


def test_laion_claps_list_of_captions_in_the_json_is_the_caption_and_its_alternatives():
    import json

    from data_pipeline.config import MembersConfig

    members = {"json": json.dumps({"text": ["", "a dog barks", "barking nearby"]}).encode()}
    evaluation = Decoder(LoaderConfig(train="x", members=MembersConfig(text_json_field="text")), None, None, train=False)
    assert evaluation(RawSample("k", members))["text"] == "a dog barks"  # the first non-empty one
    train = Decoder(LoaderConfig(train="x", members=MembersConfig(text_json_field="text")), None, None)
    seen = set()
    for seed in range(30):
        torch.default_generator.manual_seed(seed)
        seen.add(train(RawSample("k", members))["text"])
    assert seen == {"a dog barks", "barking nearby"}
    with pytest.raises(SampleError, match="missing_text"):
        Decoder(LoaderConfig(train="x", members=MembersConfig(text_json_field="text"), require=["text"]), None, None)(
            RawSample("k", {"json": json.dumps({"text": ["", 3]}).encode()}))
