"""Caption processing: valid UTF-8, whitespace normalised, length limits; every failure has a reason."""

from __future__ import annotations

import unicodedata

from data_pipeline.config import TextConfig
from data_pipeline.errors import SampleError


def process_text(value: str | bytes, cfg: TextConfig) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("text_not_utf8") from None
        value = value.removeprefix("\ufeff")
    if not isinstance(value, str):
        raise SampleError("text_not_a_string", type(value).__name__)
    # NFC so visually equal captions are byte-equal; split() also removes \r, \t, non-breaking spaces.
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if not text:
        raise SampleError("text_empty")
    if len(text) < cfg.min_chars:
        raise SampleError("text_too_short", f"{len(text)} characters")
    if len(text) > cfg.max_chars:
        raise SampleError("text_too_long", f"{len(text)} characters")
    return text
