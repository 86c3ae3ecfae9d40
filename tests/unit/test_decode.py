"""The decoder's image path: a batch is each sample through the model's transform, missing images zero."""

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_pipeline.config import LoaderConfig
from data_pipeline.decode import Decoder

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
    assert torch.equal(batch_of(decoder, images), reference(transform, images))


def test_jpegs_decode_through_turbojpeg_with_pillows_pixels_and_failure_reasons(monkeypatch):
    import data_pipeline.decode as decode
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
