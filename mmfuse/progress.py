"""Progress for every stage: a live bar on a terminal, plain lines in a log file.

On a TTY it is tqdm's bar (log records printed above it through ``logging_redirect_tqdm``). Without one (SLURM, a
pipe, CI) a bar's carriage-return redraws become noise, so the same status is written as one line every
``LINE_SECONDS``: done / total, percentage, elapsed < remaining, rate, and the latest postfix (losses).
"""

from __future__ import annotations

import io
import sys

from tqdm import tqdm

LINE_SECONDS = 30.0
_LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _Lines(io.TextIOBase):
    """A file for tqdm that turns each redraw into one line of the real stderr."""

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            sys.stderr.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def progress(total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False, iterable=None,
             delay: float = 0.0) -> tqdm:
    """A tqdm over ``iterable`` (or updated by hand), drawn as the output allows; nothing at all for work that ends
    within ``delay`` seconds."""
    common = dict(iterable=iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable, delay=delay)
    if sys.stderr.isatty():
        return tqdm(**common, dynamic_ncols=True, mininterval=1)
    return tqdm(**common, file=_Lines(), mininterval=LINE_SECONDS, bar_format=_LINE_FORMAT)
