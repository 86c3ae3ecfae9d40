"""Logging for every stage: one format, and nothing printed with a credential in it.

Every record (its message and any traceback it carries) passes through ``redact_text``, and so does the traceback
of an exception no one caught: botocore and aiohttp put whole URLs, signed query strings included, in their
messages.
"""

from __future__ import annotations

import logging
import sys
import traceback

from mmfuse.redact import redact_text


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(rank: int | None = None, level: int | None = None, force: bool = False) -> None:
    """Console logging at INFO (WARNING on ranks other than 0), ``[rank N]`` in each line where ``rank`` is given;
    redacted records and uncaught tracebacks."""
    where = f" [rank {rank}]" if rank is not None else ""
    if level is None:
        level = logging.INFO if not rank else logging.WARNING
    logging.basicConfig(level=level, force=force)
    formatter = RedactingFormatter(f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
    sys.excepthook = _redacted_excepthook


def _redacted_excepthook(kind, value, tb) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))
