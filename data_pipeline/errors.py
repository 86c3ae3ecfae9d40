"""Failure of one sample, with the reason it is counted under."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class SampleError(Exception):
    """One sample cannot be written. ``reason`` is a short stable identifier (``http_404``, ``image_too_large``)
    that goes into the shard parquet and the stats counts; the message is detail for humans."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@contextmanager
def sample_step(reason: str) -> Iterator[None]:
    """Any ``Exception`` raised by one step of one sample's processing (decode, resize, encode) becomes
    ``SampleError(reason, "<type>: <message>")``: a library raising an unexpected type on odd data (Pillow's
    ``OSError: broken data stream`` on a 119808x256 JPEG, an ``OverflowError``) fails that sample, not the shard.
    ``BaseException`` outside ``Exception`` (KeyboardInterrupt, SystemExit) propagates; so must wrap only work on
    the sample's own bytes, never writes to the output store."""
    try:
        yield
    except SampleError:
        raise
    except Exception as err:
        from mmfuse.redact import redact_text

        raise SampleError(reason, redact_text(f"{type(err).__name__}: {err}")[:300]) from err
