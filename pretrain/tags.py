"""Checkpoint tags (``step_000100``) and the ``COMMITTED`` marker that makes a checkpoint folder trusted.

No torch here: the launcher checks ``run.resume`` before any rank starts, and ``mmfuse submit`` asks whether a run
is finished, both in a second.
"""

from __future__ import annotations

import re
from pathlib import Path

MARKER = "COMMITTED"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def tag_step(name: str) -> int | None:
    """The step of a checkpoint tag (``step_000100`` → 100); None for any other name."""
    match = _TAG.match(name)
    return int(match.group(1)) if match else None


def committed_tags(root: Path) -> list[str]:
    """Committed checkpoint tags, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]  # *_universal excluded
    return sorted(tags, key=tag_step)


def check_resume_path(resume: str) -> Path | None:
    """The checkpoint folder ``run.resume`` names (None for auto / none); raises if it is not a committed one."""
    if resume in ("auto", "none"):
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ValueError(f"run.resume={resume!r} is not a committed checkpoint folder (no {MARKER} file in it)")
    return path
