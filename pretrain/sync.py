"""Committed checkpoints mirrored to object storage (``run.checkpoint_sync=s3://bucket/prefix``).

Layout under the URL: ``step_NNNNNN/`` (the checkpoint's files) and ``latest_committed``, as in the run folder.
A checkpoint is uploaded after it is committed locally, its ``COMMITTED`` marker last, so a remote folder without
the marker (an upload cut short) is never resumed from. Credentials come from the environment (``AWS_*``); URLs
are redacted in every log line and error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmfuse.storage import filesystem, join, write_bytes

from mmfuse.redact import redact
from mmfuse.commits import MARKER, tag_step

log = logging.getLogger(__name__)


class CheckpointSync:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)

    def upload(self, local: Path, tag: str) -> None:
        """Copy the committed checkpoint folder ``local`` to ``URL/tag``: data files first, the marker last."""
        remote = join(self.root, tag)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MARKER)
        for path in files:
            self.fs.put_file(str(path), join(remote, path.relative_to(local).as_posix()))
        write_bytes(self.fs, join(remote, MARKER), (local / MARKER).read_bytes())
        write_bytes(self.fs, join(self.root, "latest_committed"), tag.encode())
        log.info("synced checkpoint %s to %s (%d files)", tag, redact(self.url), len(files) + 1)

    def committed(self) -> list[str]:
        """Committed tags under the URL, oldest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        tags = [name for name in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if tag_step(name) is not None]
        return sorted((t for t in tags if self.fs.exists(join(self.root, t, MARKER))), key=tag_step)

    def prune(self, keep: int, protect: str | None = None) -> None:
        """Keep the newest ``keep`` committed checkpoints under the URL (never the newest one), and ``protect`` (the
        run's best checkpoint, ``run.keep_best``)."""
        for tag in self.committed()[: -max(1, keep)]:
            if tag == protect:
                continue
            # The marker goes first: a half-deleted folder is then never taken for a whole checkpoint.
            self.fs.rm(join(self.root, tag, MARKER))
            self.fs.rm(join(self.root, tag), recursive=True)

    def write_best(self, record: bytes) -> None:
        """Mirror ``checkpoints/best.json`` (which checkpoint ``run.keep_best`` picked) to ``URL/best.json``."""
        write_bytes(self.fs, join(self.root, "best.json"), record)

    def set_aside(self, tags: list[str], suffix: str) -> None:
        """Rename ``tags`` to ``<tag><suffix>`` (the marker first, so none of them is taken for committed again)."""
        for tag in tags:
            source, target = join(self.root, tag), join(self.root, f"{tag}{suffix}")
            self.fs.rm(join(source, MARKER))
            for entry in self.fs.find(source):  # object stores have no rename: copy each object, then delete
                self.fs.copy(entry, join(target, entry[len(source.rstrip("/")) + 1:]))
            self.fs.rm(source, recursive=True)

    def download_newest(self, local_root: Path) -> str | None:
        """Fetch the newest committed checkpoint into ``local_root/<tag>`` (marker last); its tag, or None."""
        tags = self.committed()
        if not tags:
            return None
        tag = tags[-1]
        remote, target = join(self.root, tag), local_root / tag
        target.mkdir(parents=True, exist_ok=True)
        for entry in self.fs.find(remote):
            name = entry[len(remote.rstrip("/")) + 1:]
            if name != MARKER:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(entry, str(target / name))
        tmp = target / f".{MARKER}.tmp"
        self.fs.get_file(join(remote, MARKER), str(tmp))
        os.replace(tmp, target / MARKER)
        log.info("fetched checkpoint %s from %s", tag, redact(self.url))
        return tag

