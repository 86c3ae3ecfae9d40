"""Image processing: bytes → checked, oriented, RGB, resized, re-encoded bytes.

Order matters for speed and safety:
1. open lazily and read the header only: refuse decompression bombs (pixel count) and failed filters before any
   pixel is decoded;
2. decode JPEGs already shrunk: libjpeg-turbo scales in the DCT domain by any factor n/8, never below the target
   size, several times cheaper than a full decode followed by a resize. Through simplejpeg (TurboJPEG) every n/8
   is available (1024x768 → 256 decodes at 3/8, leaving a 1.1x resize); Pillow's ``draft`` only offers 1/2, 1/4
   and 1/8 (3/8 would decode at 1/2 and leave a 1.5x resize, the slowest step). CMYK and anything simplejpeg
   refuses (truncated or corrupt data included) go through Pillow, which decides the failure reason;
3. apply the EXIF orientation, convert to RGB (CMYK, 16-bit, palette and alpha included), resize to a size
   computed from the original dimensions (so it does not depend on the decode scale), encode.

bench/shard.py measures this against img2dataset and against a bare decode → resize → encode loop.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from data_pipeline.config import ImageConfig
from data_pipeline.errors import SampleError, sample_step

# EXIF orientation → the transpose that shows the picture upright (ImageOps.exif_transpose's table).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Orientations 5-8 swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\0", b"MM\0*")
# The longest side each encoder writes (libjpeg: 65500, libwebp: 16383); PNG's limit is far above any bomb guard.
_MAX_ENCODED_SIDE = {"jpg": 65500, "webp": 16383, "png": 2**31 - 1}
_ENCODE_ARGS = {
    "jpg": lambda q: {"format": "JPEG", "quality": q},
    "webp": lambda q: {"format": "WEBP", "quality": q, "method": 4},
    "png": lambda q: {"format": "PNG", "compress_level": 6},
}


def _keep_freed_image_memory() -> None:
    """Let Pillow reuse the memory of freed images instead of returning it to malloc.

    With a worker's many threads, glibc trims each thread's heap as soon as an image is freed, so the next image
    faults its pages in again: ~340 page faults and ~15% more CPU per 1024x768 photo (bench/RESULTS.md). Pillow's
    own cache (the PILLOW_BLOCKS_MAX / PILLOW_BLOCK_SIZE knobs) keeps up to 32 freed blocks of at most 1 MiB,
    i.e. at most 32 MiB per process. Settings the user gave through those variables are left alone.
    """
    if "PILLOW_BLOCKS_MAX" not in os.environ and "PILLOW_BLOCK_SIZE" not in os.environ:
        Image.core.set_block_size(1 << 20)
        Image.core.set_blocks_max(32)


_keep_freed_image_memory()


def process_image(data: bytes, cfg: ImageConfig) -> tuple[bytes, dict]:
    """Returns the encoded image and its metadata; raises SampleError with the reason it was refused.

    Every error of the decode, resize and encode steps fails this image alone (``image_decode_error``,
    ``image_resize_error``, ``image_encode_error``, with the exception's type and message as detail)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise SampleError("image_too_large", "decompression bomb") from None
        except UnidentifiedImageError:
            # A known image signature that Pillow cannot parse is a corrupt image; anything else (an HTML error
            # page saved as .jpg, say) is not an image at all.
            reason = "image_decode_error" if data.startswith(_IMAGE_MAGIC) else "not_an_image"
            raise SampleError(reason) from None
        except Exception as err:  # Pillow raises many types for broken headers
            raise SampleError("image_decode_error", type(err).__name__) from None

        stored_width, stored_height = image.size
        if stored_width * stored_height > cfg.max_pixels:
            raise SampleError("image_too_large", f"{stored_width}x{stored_height} exceeds {cfg.max_pixels} pixels")
        orientation = _orientation(image)
        width, height = (stored_height, stored_width) if orientation in _TRANSPOSED_ORIENTATIONS else image.size
        _check_filters(width, height, cfg)

        # The decode target is in the stored (not yet oriented) frame; the scale is the same in both.
        scale = _scale(width, height, cfg)
        shrunk = (math.ceil(stored_width * scale), math.ceil(stored_height * scale)) if scale < 1 else None
        with sample_step("image_decode_error"):
            decoded = decode_jpeg_fast(data, shrunk) if image.format == "JPEG" and image.mode in ("RGB", "L") else None
            if decoded is None:
                decoded = _decode_pillow(image, shrunk)
            transpose = _ORIENTATION_TRANSPOSE.get(orientation)
            image = decoded.transpose(transpose) if transpose is not None else decoded
            image = to_rgb(image, cfg.border_color)
    with sample_step("image_resize_error"):
        image = resize(image, cfg, (width, height))
    out = io.BytesIO()
    with sample_step("image_encode_error"):
        image.save(out, **_ENCODE_ARGS[cfg.format](cfg.quality))
    meta = {"width": image.width, "height": image.height, "original_width": width, "original_height": height}
    return out.getvalue(), meta


def decode_jpeg_fast(data: bytes, shrunk: tuple[int, int] | None) -> Image.Image | None:
    """TurboJPEG's scaled decode to RGB (greyscale is expanded), or None to let Pillow decode (and judge) it.

    ``strict`` turns libjpeg's warnings (premature end of data, corrupt segments) into errors, so anything short
    of a clean stream takes the Pillow path and keeps Pillow's failure reasons.
    """
    min_width, min_height = shrunk or (0, 0)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width, strict=True)
    except Exception:  # ValueError for bad data; anything else is Pillow's to report too
        return None
    return Image.fromarray(pixels)


def _decode_pillow(image: Image.Image, shrunk: tuple[int, int] | None) -> Image.Image:
    if shrunk and image.format in ("JPEG", "MPO"):
        image.draft("RGB", shrunk)  # 1/2, 1/4 or 1/8 scale, never below the requested size
    try:
        image.load()
    except OSError as err:
        reason = "image_truncated" if "truncated" in str(err) else "image_decode_error"
        raise SampleError(reason, str(err)) from None
    except Exception as err:
        raise SampleError("image_decode_error", f"{type(err).__name__}: {err}") from None
    return image


def upright_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transpose that shows ``image`` upright per its EXIF orientation; None when it already is."""
    return _ORIENTATION_TRANSPOSE.get(_orientation(image))


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixels; a decode error
        # there, swallowed below, left a broken PNG "loaded" as black pixels. An eXIf chunk before them is in info.
        return 1
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block is not worth failing the image over
        return 1


def _check_filters(width: int, height: int, cfg: ImageConfig) -> None:
    """The guards that need only the header: extreme aspect ratio, tiny, and a resized size no encoder can write
    or that would itself be a bomb (a 20000x1 strip resized to a 256 short side is 5,120,000x256)."""
    if cfg.max_aspect_ratio and max(width, height) > cfg.max_aspect_ratio * max(1, min(width, height)):
        raise SampleError("bad_aspect_ratio", f"{width}x{height}")
    if min(width, height) < max(cfg.min_side, 1):
        raise SampleError("image_too_small", f"{width}x{height}")
    scale = _scale(width, height, cfg)
    resized = (max(1, round(width * scale)), max(1, round(height * scale)))
    stored = resized  # what the encoder gets
    if cfg.resize_mode == "center_crop":
        stored = (min(cfg.size, *resized),) * 2
    elif cfg.resize_mode == "border":
        stored = (cfg.size, cfg.size)
    if resized[0] * resized[1] > cfg.max_pixels or max(stored) > _MAX_ENCODED_SIDE[cfg.format]:
        raise SampleError("image_too_large", f"{width}x{height} would resize to {resized[0]}x{resized[1]}")


def _scale(width: int, height: int, cfg: ImageConfig) -> float:
    """The factor that maps the (oriented) image onto the target geometry."""
    if cfg.resize_mode == "no":
        return 1.0
    side = max(width, height) if cfg.resize_mode == "border" else min(width, height)
    scale = cfg.size / side
    return min(scale, 1.0) if cfg.resize_only_if_bigger else scale


def to_rgb(image: Image.Image, background: int = 255) -> Image.Image:
    """RGB from any mode: 16-bit and 32-bit greyscale are scaled (not clipped), alpha is composited."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size and array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (background, background, background, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, cfg: ImageConfig, original_size: tuple[int, int] | None = None) -> Image.Image:
    """Resize per ``cfg``. ``original_size``: the (oriented) size before any decode-time shrinking; the target
    is computed from it, so a JPEG decoded at 3/8 or 1/2 scale ends at the size a full decode would give."""
    if cfg.resize_mode == "no":
        return image
    width, height = original_size or image.size
    scale = _scale(width, height, cfg)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    if cfg.resize_mode == "center_crop":
        side = min(cfg.size, image.width, image.height)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif cfg.resize_mode == "border":
        side = cfg.size
        canvas = Image.new("RGB", (side, side), (cfg.border_color,) * 3)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image
