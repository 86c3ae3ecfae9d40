"""Caption processing: valid UTF-8, control characters stripped, whitespace normalised, length limits; every
failure has a reason."""

from __future__ import annotations

import re
import unicodedata

from data_pipeline.config import TextConfig
from data_pipeline.errors import SampleError

# C0 and C1 control characters (Unicode category Cc) that str.split() does not already treat as whitespace: NUL,
# bell, backspace, escape, DEL, ... They are invisible, break tokenizers and C-string consumers, and never carry
# meaning in a caption.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


def clean_caption(value: str) -> tuple[str, int]:
    """(the caption with control characters removed, NFC-normalised and whitespace collapsed, how many control
    characters were removed)."""
    value, stripped = _CONTROL.subn("", value)
    # NFC so visually equal captions are byte-equal; split() also removes \r, \t, non-breaking spaces.
    return " ".join(unicodedata.normalize("NFC", value).split()), stripped


def strip_control(value: str) -> str:
    """``value`` without control characters (for captions read back from shards someone else made)."""
    return _CONTROL.sub("", value)


def decode_caption(value: str | bytes) -> tuple[str, int]:
    """``clean_caption`` of a str, or of bytes that must be UTF-8 (a leading BOM is dropped); SampleError
    ``text_not_utf8`` / ``text_not_a_string`` otherwise."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SampleError("text_not_utf8") from None
        value = value.removeprefix("\ufeff")
    if not isinstance(value, str):
        raise SampleError("text_not_a_string", type(value).__name__)
    return clean_caption(value)


def process_text(value: str | bytes, cfg: TextConfig) -> tuple[str, int]:
    """(the stored caption, how many control characters were stripped from it); SampleError when refused."""
    text, stripped = decode_caption(value)
    if not text:
        raise SampleError("text_empty", f"after stripping {stripped} control characters" if stripped else "")
    if len(text) < cfg.min_chars:
        raise SampleError("text_too_short", f"{len(text)} characters")
    if len(text) > cfg.max_chars:
        raise SampleError("text_too_long", f"{len(text)} characters")
    return text, stripped
