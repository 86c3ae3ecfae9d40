import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipeline.config import ImageConfig
from data_pipeline.errors import SampleError, sample_step
from data_pipeline.image import process_image


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode, expected", [
    ("keep_ratio", (341, 256)),
    ("center_crop", (256, 256)),
    ("border", (256, 256)),
    ("no", (400, 300)),
])
def test_resize_modes(mode, expected):
    data, meta = process_image(encode(photo(400, 300)), ImageConfig(size=256, resize_mode=mode))
    assert decoded(data).size == expected
    assert (meta["width"], meta["height"]) == expected
    assert (meta["original_width"], meta["original_height"]) == (400, 300)


def test_border_pads_with_border_colour():
    data, _ = process_image(encode(photo(400, 100)), ImageConfig(size=200, resize_mode="border", border_color=0, format="png"))
    pixels = np.asarray(decoded(data))
    assert pixels.shape == (200, 200, 3)
    assert pixels[:10].max() == 0 and pixels[-10:].max() == 0  # letterbox bands
    assert pixels[100].mean() > 20


def test_draft_mode_matches_full_decode_closely():
    """The DCT-domain downscale must give (nearly) the picture a full decode + resize gives."""
    source = encode(photo(1024, 768), quality=95)
    fast, _ = process_image(source, ImageConfig(size=256, format="png"))
    reference = photo(1024, 768).resize((341, 256), Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(decoded(fast), dtype=float) - np.asarray(reference, dtype=float))
    assert decoded(fast).size == (341, 256)
    assert diff.mean() < 6


def test_no_upscale_when_only_if_bigger():
    data, meta = process_image(encode(photo(100, 80)), ImageConfig(size=256, resize_only_if_bigger=True))
    assert decoded(data).size == (100, 80)
    data, _ = process_image(encode(photo(100, 80)), ImageConfig(size=256))
    assert decoded(data).size == (320, 256)


def exif_rotated_jpeg(orientation: int) -> bytes:
    image = photo(200, 100)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, exif=exif.tobytes())


def test_exif_orientation_is_applied():
    data, meta = process_image(exif_rotated_jpeg(6), ImageConfig(size=50, resize_mode="keep_ratio"))
    assert decoded(data).size == (50, 100)  # rotated 90°: portrait now
    assert (meta["original_width"], meta["original_height"]) == (100, 200)


def test_cmyk_becomes_rgb():
    data, _ = process_image(encode(photo(120, 90).convert("CMYK")), ImageConfig(size=64))
    image = decoded(data)
    assert image.mode == "RGB" and image.size == (85, 64)


def test_16_bit_greyscale_is_scaled_not_clipped():
    ramp = (np.tile(np.linspace(0, 65535, 128), (64, 1))).astype(np.uint16)
    data, _ = process_image(encode(Image.fromarray(ramp), "PNG"), ImageConfig(size=64, resize_mode="no", format="png"))
    pixels = np.asarray(decoded(data))[..., 0].astype(int)
    assert pixels[:, 0].max() < 5 and pixels[:, -1].min() > 250
    assert 100 < pixels[:, 64].mean() < 160  # mid-grey, not saturated white


def test_transparency_composited_on_background():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    data, _ = process_image(encode(rgba, "PNG"), ImageConfig(size=64, resize_mode="no", format="png", border_color=255))
    assert tuple(np.asarray(decoded(data))[0, 0]) == (255, 255, 255)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (refused before any pixel is decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width, height", [(20000, 20000), (100000, 100000)])
def test_decompression_bomb_refused_from_header(width, height):
    with pytest.raises(SampleError) as err:
        process_image(bomb_png(width, height), ImageConfig())
    assert err.value.reason == "image_too_large"


def test_pixel_limit_is_configurable():
    with pytest.raises(SampleError, match="image_too_large"):
        process_image(encode(photo(100, 100)), ImageConfig(max_pixels=5000))


@pytest.mark.parametrize("data, reason", [
    (b"<html><body>not found</body></html>", "not_an_image"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 40, "image_decode_error"),
])
def test_garbage_is_refused(data, reason):
    with pytest.raises(SampleError) as err:
        process_image(data, ImageConfig())
    assert err.value.reason == reason


def test_truncated_jpeg():
    data = encode(photo(400, 300))
    with pytest.raises(SampleError) as err:
        process_image(data[: len(data) // 2], ImageConfig(size=64))
    assert err.value.reason in ("image_truncated", "image_decode_error")


@pytest.mark.parametrize("cfg, reason", [
    (ImageConfig(min_side=200), "image_too_small"),
    (ImageConfig(max_aspect_ratio=2.0), "bad_aspect_ratio"),
])
def test_filters(cfg, reason):
    with pytest.raises(SampleError) as err:
        process_image(encode(photo(300, 100)), cfg)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt, magic", [("jpg", b"\xff\xd8"), ("webp", b"RIFF"), ("png", b"\x89PNG")])
def test_output_formats(fmt, magic):
    data, _ = process_image(encode(photo(120, 90)), ImageConfig(size=64, format=fmt))
    assert data.startswith(magic)


def test_quality_changes_size_and_output_is_deterministic():
    source = encode(photo(400, 300))
    low, _ = process_image(source, ImageConfig(quality=30))
    high, _ = process_image(source, ImageConfig(quality=95))
    again, _ = process_image(source, ImageConfig(quality=95))
    assert len(low) < len(high) and high == again


@pytest.mark.parametrize("size", [(468, 1), (1, 468), (20000, 1), (210, 10)])
def test_extreme_aspect_ratio_is_refused_by_default(size):
    """Issue 20: a 468x1 PNG resized to a 256 short side is 119808x256, which JPEG cannot encode; it crashed the
    shard. The default guard (20:1) refuses it from the header, before any pixel is decoded."""
    with pytest.raises(SampleError) as err:
        process_image(encode(Image.new("RGB", size, (9, 9, 9)), "PNG"), ImageConfig())
    assert (err.value.reason, err.value.detail) == ("bad_aspect_ratio", f"{size[0]}x{size[1]}")


def test_aspect_ratio_just_under_the_guard_is_kept():
    _, meta = process_image(encode(photo(380, 20)), ImageConfig())
    assert (meta["width"], meta["height"]) == (4864, 256)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size, cfg", [
    ((468, 1), ImageConfig(max_aspect_ratio=0, min_side=1)),  # 119808x256: past JPEG's 65500 side
    ((20000, 1), ImageConfig(max_aspect_ratio=0, min_side=1)),  # 5,120,000x256: a bomb made by the resize (took 22 s)
    ((400, 20), ImageConfig(max_aspect_ratio=0, format="webp", size=1000)),  # 20000x1000: past WebP's 16383 side
])
def test_guard_off_an_unencodable_resize_is_refused_not_crashed(size, cfg):
    with pytest.raises(SampleError) as err:
        process_image(encode(Image.new("L", size, 50), "PNG"), cfg)
    assert err.value.reason == "image_too_large" and "would resize to" in err.value.detail


def test_tiny_images_are_refused_by_default():
    with pytest.raises(SampleError) as err:
        process_image(encode(Image.new("P", (1, 1)), "GIF"), ImageConfig())
    assert err.value.reason == "image_too_small"
    assert process_image(encode(Image.new("P", (1, 1)), "GIF"), ImageConfig(min_side=1))[1]["width"] == 256


def test_broken_png_fails_instead_of_becoming_black():
    """Pillow's PNG getexif() decoded the pixels and the error was swallowed: the PNG was stored all black."""
    data = bytearray(encode(photo(64, 64), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 6] = b"\0\0"
    with pytest.raises(SampleError) as err:
        process_image(bytes(data), ImageConfig())
    assert err.value.reason == "image_decode_error"


def test_sample_step_names_the_failure_and_lets_interrupts_through():
    with pytest.raises(SampleError) as err, sample_step("image_encode_error"):
        Image.new("RGB", (119808, 256)).save(io.BytesIO(), format="JPEG")  # what crashed the shard in issue 20
    assert err.value.reason == "image_encode_error" and err.value.detail.startswith("OSError: broken data stream")
    with pytest.raises(KeyboardInterrupt), sample_step("image_encode_error"):
        raise KeyboardInterrupt


@pytest.mark.parametrize("image", [
    photo(90, 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=8),
    photo(90, 60).convert("RGBA"),
    photo(90, 60).convert("1"),
    Image.fromarray(np.tile(np.linspace(0, 65535, 90), (60, 1)).astype(np.uint16)),
], ids=["palette", "rgba", "bilevel", "grey16"])
@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF", "WEBP"])
def test_odd_but_valid_images_are_converted(image, fmt):
    try:
        data = encode(image, fmt, **({"transparency": 0} if fmt == "PNG" and image.mode == "P" else {}))
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow cannot write {image.mode} as {fmt}")
    out, meta = process_image(data, ImageConfig(size=32))
    assert (meta["width"], meta["height"]) == (48, 32) and decoded(out).mode == "RGB"
