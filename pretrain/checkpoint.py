"""One checkpoint manager for everything stateful: model, optimizer and scheduler (DeepSpeed, sharded per rank),
step, samples seen, every rank's loader position and RNG state, the resolved config.

Layout: ``RUN/checkpoints/step_000100/`` (DeepSpeed's files for that tag) plus ``COMMITTED`` in it, written by
rank 0 after a barrier that follows every rank's save. DeepSpeed's own ``latest`` file is written before its final
barrier, so it cannot mark a whole checkpoint; only ``COMMITTED`` does, and resume trusts nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmfuse.commits import MARKER, check_resume_path, commit, committed_tags, prune, tag_for, tag_step, uncommit

log = logging.getLogger(__name__)


def saved_zero_stage(folder: Path) -> int:
    """The ZeRO stage a committed checkpoint was written with: its marker says so; older markers do not, and then
    DeepSpeed's file names tell (per-rank model states: stage 3; per-rank optimizer states: 1-2, read as 2)."""
    saved = json.loads((folder / MARKER).read_text())
    if "zero_stage" in saved:
        return int(saved["zero_stage"])
    from pretrain.engine import checkpoint_zero_stage

    return checkpoint_zero_stage(folder)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_best(root: Path) -> dict | None:
    """The best checkpoint recorded under ``root`` (a run's checkpoints/), or None (none recorded, or gone)."""
    path = Path(root) / "best.json"
    try:
        best = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return best if (Path(root) / best.get("tag", "") / MARKER).is_file() else None


class CheckpointManager:
    def __init__(self, run_dir: Path, keep: int, rank: int, world_size: int, zero_stage: int, sync_url: str = ""):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.rank, self.world_size, self.zero_stage = max(1, keep), rank, world_size, zero_stage
        self.sync = None
        if sync_url:
            from pretrain.sync import CheckpointSync

            self.sync = CheckpointSync(sync_url)

    def save(self, engine, step: int, client: dict, loader_state: dict) -> str:
        """Every rank calls this at the same step. Returns the tag once it is committed."""
        tag = tag_for(step)
        if self.rank == 0:
            uncommit(self.root / tag)
        dist.barrier()
        per_rank = {"loader": loader_state, "rng": rng_state()}
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, per_rank)
        client = {**client, "step": step, "ranks": gathered, "world_size": self.world_size,
                  # The DeepSpeed converter to universal checkpoints (change of world size) needs this key.
                  "universal_checkpoint_info": {}}
        engine.save(self.root, tag, client)
        dist.barrier()
        if self.rank == 0:
            commit(self.root / tag, {"step": step, "time": time.time(), "world_size": self.world_size,
                                     "zero_stage": engine.zero_stage, "code_version": client.get("code_version")})
            (self.root / "latest_committed.tmp").write_text(tag)
            os.replace(self.root / "latest_committed.tmp", self.root / "latest_committed")
            self._prune(tag)
            self._upload(tag)
        dist.barrier()
        return tag

    def best(self) -> dict | None:
        """``checkpoints/best.json`` (tag, step, metric, value, evaluations) when its checkpoint is still committed
        here: a resume from an older checkpoint sets the newer ones aside, and with them a best that is gone."""
        return read_best(self.root)

    def consider_best(self, step: int, metric: str, value: float) -> bool:
        """Rank 0 records step ``step`` (committed just before its evaluation) as the best when ``value`` beats the
        recorded best (higher is better; lower for a loss), then prunes what neither run.keep nor the best holds."""
        if self.rank != 0:
            return False
        best = self.best()
        lower = metric.endswith("loss")
        evaluations = (best or {}).get("evaluations", 0) + 1
        better = best is None or (value < best["value"] if lower else value > best["value"])
        record = {"tag": tag_for(step), "step": step, "metric": metric, "value": value} if better else dict(best)
        record["evaluations"] = evaluations
        tmp = self.root / "best.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.root / "best.json")
        if better:
            log.info("step %d is the best checkpoint so far by %s = %.4g", step, metric, value)
            self._prune(committed_tags(self.root)[-1])
        self._mirror(lambda sync: sync.write_best((self.root / "best.json").read_bytes()), "best.json")
        return better

    def _upload(self, tag: str) -> None:
        """Mirror a committed checkpoint to ``run.checkpoint_sync``, pruned there as here (the best one kept)."""
        def upload(sync) -> None:
            sync.upload(self.root / tag, tag)
            best = self.best()
            sync.prune(self.keep, protect=best["tag"] if best else None)

        self._mirror(upload, f"checkpoint {tag}")

    def _mirror(self, action, what: str) -> None:
        """Run ``action(sync)`` when ``run.checkpoint_sync`` is set. A failure costs the remote copy of ``what``,
        not the run: it is logged (redacted) and training goes on."""
        if self.sync is None:
            return
        try:
            action(self.sync)
        except Exception as err:  # network and object-store errors come in many types
            from mmfuse.redact import redact, redact_text

            log.error("could not sync %s to %s: %s (it stays committed locally)", what,
                      redact(self.sync.url), redact_text(str(err)) or type(err).__name__)

    def _prune(self, newest: str) -> None:
        """Keep the newest ``keep`` committed checkpoints; drop uncommitted leftovers older than the newest."""
        newest_step = tag_step(newest)
        best = self.best()
        for tag in prune(self.root, self.keep, {best["tag"]} if best else set()):
            shutil.rmtree(self.root / f"{tag}_universal", ignore_errors=True)
        for path in self.root.iterdir():
            step = tag_step(path.name)
            if step is not None and step < newest_step and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """(folder, tag) to resume from: ``auto`` = newest committed here, ``none``, or a checkpoint folder."""
        if resume == "none":
            return None
        if resume == "auto":
            if self.sync is not None:
                # Nothing here (a new machine, a lost disk): the newest committed checkpoint in object storage.
                # Rank 0 alone decides and every rank waits for it: a rank that looked for itself could find the
                # download rank 0 had just finished, skip this barrier and leave rank 0 waiting in it forever.
                if self.rank == 0 and not committed_tags(self.root):
                    self.root.mkdir(parents=True, exist_ok=True)
                    self.sync.download_newest(self.root)
                dist.barrier()
            tags = committed_tags(self.root)
            return (self.root, tags[-1]) if tags else None
        path = check_resume_path(resume)
        return path.parent, path.name

    def set_aside_newer(self, step: int, resumed_root: Path | None) -> list[str]:
        """Resumed at ``step`` from this run's own checkpoints while newer ones are committed here (``run.resume``
        named an older one): those belong to the abandoned run and would be resumed from next time, or overwritten
        by this run's saves. Rank 0 renames them (and their synced copies) to ``<tag>.abandoned-<time>``, which
        nothing selects or prunes. A checkpoint of another run folder leaves this one's as they are."""
        if resumed_root is None or Path(resumed_root).resolve() != self.root.resolve():
            return []
        newer = [tag for tag in committed_tags(self.root) if tag_step(tag) > step]
        remote = [tag for tag in self.sync.committed() if tag_step(tag) > step] if self.sync and self.rank == 0 else []
        if self.rank == 0 and (newer or remote):
            suffix = f".abandoned-{time.strftime('%Y%m%dT%H%M%S')}"
            for tag in newer:
                os.replace(self.root / tag, self.root / f"{tag}{suffix}")
                shutil.rmtree(self.root / f"{tag}_universal", ignore_errors=True)  # derived, rebuilt on demand
            if newer:
                (self.root / "latest_committed").write_text(tag_for(step))
            if remote:  # the other ranks wait at the barrier below: a copy per object, slow for big checkpoints
                self.sync.set_aside(remote, suffix)
            log.warning("resuming at step %d: the newer checkpoints %s are set aside as <tag>%s", step,
                        ", ".join(sorted(set(newer) | set(remote), key=tag_step)), suffix)
        dist.barrier()
        return newer

    def check_resume_layout(self, where: tuple[Path, str]) -> bool:
        """Whether a checkpoint loads through a universal checkpoint here; raises if it cannot load here at all.

        ZeRO 1-3 shard the optimizer state per rank, so another world size needs the conversion; stages 1 and 2
        read each other's shards as they are. Stage 0 keeps everything whole in the model-states file, which loads
        at any world size. DeepSpeed cannot convert between stage 0, stages 1-2 and stage 3 (each reads its own
        layout of the optimizer state; a universal checkpoint from stage 2 fails inside ZeRO-3): refused here.
        """
        root, tag = where
        stage = saved_zero_stage(root / tag)
        family = {0: "0", 1: "1-2", 2: "1-2", 3: "3"}
        if family[stage] != family[self.zero_stage]:
            raise ValueError(
                f"checkpoint {root / tag} was written with ZeRO stage {stage}, and DeepSpeed cannot load it at stage "
                f"{self.zero_stage} (stages 0, 1-2 and 3 keep the optimizer state in different layouts): resume with "
                f"engine.zero_stage={stage} (at any world size)")
        saved_world_size = json.loads((root / tag / MARKER).read_text())["world_size"]
        return stage != 0 and saved_world_size != self.world_size

    def to_universal(self, where: tuple[Path, str]) -> tuple[Path, str]:
        """Convert a checkpoint written at another world size into a DeepSpeed universal checkpoint (rank 0 does
        the work once; the result sits beside it as ``<tag>_universal`` and is reused)."""
        root, tag = where
        target = root / f"{tag}_universal"
        if self.rank == 0 and not (target / MARKER).is_file():
            from pretrain.engine import to_universal_checkpoint

            shutil.rmtree(target, ignore_errors=True)
            to_universal_checkpoint(root / tag, target)
            # The client state (step, loader, config) lives in the model-states file the converter copies.
            (target / MARKER).write_text((root / tag / MARKER).read_text())
        dist.barrier()
        return root, target.name

    def load(self, engine, where: tuple[Path, str]) -> dict:
        """Load model, optimizer and scheduler; return the client state with this rank's loader and RNG state."""
        root, tag = where
        client = engine.load(root, tag)
        if client["world_size"] != self.world_size:
            # Another world size: model and optimizer come from the universal checkpoint; per-rank loader and RNG
            # states do not map onto the new ranks, so the data stream restarts its epoch with the new layout.
            log.warning("resuming %d-rank checkpoint %s on %d ranks: data restarts epoch %d", client["world_size"], tag,
                        self.world_size, client["ranks"][0]["loader"]["epoch"])
            return {**client, "loader": None}
        mine = client["ranks"][self.rank]
        set_rng_state(mine["rng"])
        log.info("resumed from %s at step %d", root / tag, client["step"])
        return {**client, "loader": mine["loader"]}
