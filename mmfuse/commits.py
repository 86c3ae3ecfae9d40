"""The checkpoint commit protocol every stage that trains uses (pre-training and fine-tuning alike).

A checkpoint is a folder named by its tag (``step_000100``). Every rank writes its part; after a barrier, rank 0
writes the ``COMMITTED`` marker (atomically: a temporary file, then a rename). Only a folder with the marker is
trusted: resume, export and pruning read nothing else. A tag saved again (after a rollback) loses its marker first,
so it is never trusted while it is being rewritten.

No torch here: the launcher checks ``run.resume`` before any rank starts, and ``mmfuse submit`` asks whether a run
is finished, both in a second.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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


def uncommit(folder: Path) -> None:
    """Rank 0, before any rank rewrites ``folder``: it is not a checkpoint until ``commit`` marks it again."""
    (folder / MARKER).unlink(missing_ok=True)


def commit(folder: Path, record: dict) -> None:
    """Rank 0, after every rank's part of ``folder`` is written: mark it committed, ``record`` (step, time, ...)
    in the marker."""
    tmp = folder / f".{MARKER}.{os.getpid()}.tmp"  # this process's own: no other writer can rename it away
    tmp.write_text(json.dumps(record))
    try:
        os.replace(tmp, folder / MARKER)
    except FileNotFoundError as err:  # seen once in CI: say what the folder held, for the next time
        held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "the folder is gone"
        raise FileNotFoundError(f"committing {folder}: {err}; it holds {held}") from err


def prune(root: Path, keep: int, protect: set[str] = frozenset()) -> list[str]:
    """Delete all but the newest ``keep`` committed checkpoints under ``root`` (never one in ``protect``); returns
    the tags deleted."""
    doomed = [tag for tag in committed_tags(root)[:-max(1, keep)] if tag not in protect]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return doomed


def check_resume_path(resume: str) -> Path | None:
    """The checkpoint folder ``run.resume`` names (None for auto / none); raises if it is not a committed one."""
    if resume in ("auto", "none"):
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise ValueError(f"run.resume={resume!r} is not a committed checkpoint folder (no {MARKER} file in it)")
    return path
