"""The streaming training loader: shards → decoded, batched tensors, with exact mid-epoch resume.

    loader = build_loader(cfg, rank, world_size, image_transform=..., tokenizer=...)
    loader.load_state_dict(saved)          # optional: continue where a checkpoint stopped
    for batch in loader:                   # one epoch from the current position
        ...
        state = loader.state_dict()        # {"epoch", "step", ...}: enough to resume exactly

A position is (epoch, batches this rank has consumed): the plan (``plan.py``) is a pure function of the config,
so each worker recomputes its own shard, offset and shuffle state from it, and prefetched-but-unconsumed batches
need no saving. Resuming skips already-consumed samples by walking tar headers, without decoding them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import time
import weakref
import zlib
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.loader.batchring import RingReceiver, WorkerRing
from data_pipeline.config import LoaderConfig
from data_pipeline.loader.decode import Decoder
from data_pipeline.errors import SampleError
from data_pipeline.loader.plan import SlotPlan, check_feasible, slot_plan, windows
from data_pipeline.loader.sources import Source, resolve_sources
from mmfuse.redact import redact_text
from data_pipeline.loader.tarstream import RawSample, ShardError, iter_samples
from mmfuse.allocator import keep_freed_memory

log = logging.getLogger(__name__)
_LOG_EVERY_SECONDS = 10.0


class _RateLimitedLog:
    """The first error of each reason, then at most one line per reason every few seconds (never a sleep)."""

    def __init__(self):
        self.last: dict[str, float] = {}

    def __call__(self, reason: str, detail: str, counts: Counter) -> None:
        now = time.monotonic()
        if now - self.last.get(reason, -math.inf) >= _LOG_EVERY_SECONDS:
            self.last[reason] = now
            log.warning("loader: %s (%d so far): %s", reason, counts[reason], redact_text(detail))


def _leave_sigterm_to_the_trainer() -> None:
    """SLURM stops a job (requeue, preemption, time limit) with SIGTERM to every process of each task, workers
    included. A worker that died of it would make the training process raise before it reaches the step boundary
    where it checkpoints; ignored here, the worker is shut down by the training process as usual afterwards."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _start_workers(loader) -> Iterator:
    """``iter(loader)`` with SIGTERM held back. A worker installs torch's SIGTERM handler as it starts and ignores
    SIGTERM only when it begins iterating: a SLURM stop between the two killed it (seen once in CI-sized runs). Forked
    now, a worker inherits the blocked signal until it ignores it; this process gets its own when the call returns."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


_worker_processes: "weakref.WeakSet" = weakref.WeakSet()
_reaper_registered = False


def _reap_workers_at_exit() -> None:
    """Workers ignore SIGTERM (above), so the standard library's exit hook, which terminates daemonic children
    with SIGTERM and then joins them, would wait forever for a worker of a loader that was still iterating when
    the training process exited (an exception, a halt). Registered after that hook, this runs before it and
    kills such workers outright: at exit nothing they hold is needed."""
    for worker in list(_worker_processes):
        if worker.is_alive():
            worker.kill()
            worker.join()


def _track_workers(iterator) -> None:
    """Remember this iterator's worker processes for the exit hook (registered once, after multiprocessing's)."""
    global _reaper_registered
    _worker_processes.update(getattr(iterator, "_workers", []))
    if not _reaper_registered:
        import atexit
        import multiprocessing.util  # noqa: F401  (registers its exit hook first, so ours runs before it)

        atexit.register(_reap_workers_at_exit)
        _reaper_registered = True


_niced = False


def _lower_priority(nice: int) -> None:
    """Once per worker process (``LoaderConfig.worker_nice`` says why)."""
    global _niced
    if nice and not _niced:
        os.nice(nice)
        _niced = True


def _keep_freed_memory() -> None:
    """Each ~600 KB image tensor would otherwise be mapped fresh and unmapped when freed (~150 page faults per
    image); per worker, so the training process sets its own (``mmfuse.allocator``)."""
    keep_freed_memory(64 << 20, 128 << 20)


class ShardStream(IterableDataset):
    """Yields whole batches; each DataLoader worker computes and reads only its own slot."""

    def __init__(self, cfg: LoaderConfig, sources: list[Source], decoder: Decoder, rank: int, world_size: int):
        self.cfg, self.sources, self.decoder = cfg, sources, decoder
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    def slot(self) -> tuple[int, int, int, int]:
        """(slot, slots, worker, workers) of the calling process.

        The DataLoader always starts its round-robin at worker process 0, so after resuming at step t, process
        p plays the part of worker (t + p) mod W: the first batch then comes from the worker that owns step t.
        """
        info = get_worker_info()
        process, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (self.start_step + process) % workers
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    def plan(self, slot: int, slots: int) -> SlotPlan:
        cfg = self.cfg
        return slot_plan(self.sources, cfg.mode, cfg.seed, self.epoch, slot, slots, cfg.batch_size, cfg.shuffle_window, cfg.samples_per_epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is not None:
            _keep_freed_memory()
            _leave_sigterm_to_the_trainer()
            _lower_priority(self.cfg.worker_nice)
        slot, slots, worker, workers = self.slot()
        plan = self.plan(slot, slots)
        consumed = max(0, math.ceil((self.start_step - worker) / workers))  # this worker's batches already used
        skip = sum(plan.batch_sizes[:consumed])
        counts: Counter[str] = Counter()
        warn = _RateLimitedLog()
        samples = self._ordered_samples(plan, skip, counts, warn)
        ring = WorkerRing.in_this_worker(self.cfg.prefetch_factor)
        for index in range(consumed, len(plan.batch_sizes)):
            decoded = []
            for _ in range(plan.batch_sizes[index]):
                raw = next(samples)
                if raw is None:
                    continue
                # Augmentation is a pure function of (seed, epoch, sample): identical after a resume, whatever the
                # number of workers and however many samples were skipped.
                # The CPU generator only (what CPU transforms draw from): torch.manual_seed also queues a lazy CUDA
                # seed, formatting a stack trace each call, ~200 us per sample on a CUDA build.
                torch.default_generator.manual_seed(zlib.crc32(f"{self.cfg.seed}/{self.epoch}/{raw.key}".encode()))
                try:
                    decoded.append(self.decoder(raw))
                    counts["samples"] += 1
                except SampleError as err:
                    counts[err.reason] += 1
                    warn(err.reason, f"{raw.key}: {err.detail}", counts)
            batch = self.decoder.collate(decoded, ring.empty if ring else None)
            batch["_worker"] = worker
            batch["_stats"] = dict(counts)
            yield ring.pack(batch) if ring else batch

    def _ordered_samples(self, plan: SlotPlan, skip: int, counts: Counter, warn) -> Iterator[RawSample | None]:
        """The slot's samples in shuffled order from position ``skip`` on; None where a planned sample is missing."""
        position = 0
        keep = {shard.url: shard.keep for source in self.sources for shard in source.shards if shard.keep is not None}
        reader = _SegmentReader(self.cfg, self.decoder.wanted, counts, warn, keep)
        for index, window in enumerate(windows(plan)):
            if position + len(window) <= skip:
                position += len(window)
                continue
            raws = [reader.get(segment, i) for segment, i in window]
            order = plan.window_order(index, len(window))
            for k in order[max(0, skip - position):]:
                yield raws[k]
            position += len(window)
        reader.close()


class _SegmentReader:
    """Reads planned samples in order, keeping one tar open; counts short shards and corrupt tars."""

    def __init__(self, cfg: LoaderConfig, wanted: set[str], counts: Counter, warn,
                 keep: dict[str, tuple[int, ...]] | None = None):
        self.cfg, self.wanted, self.counts, self.warn = cfg, wanted, counts, warn
        self.keep = keep or {}  # url -> the tar positions of a curated shard's samples (data.keep)
        self._url: str | None = None
        self._next_index = 0
        self._it: Iterator[RawSample] | None = None
        self._broken = False

    def get(self, segment, index: int) -> RawSample | None:
        if segment.url != self._url or index != self._next_index:
            self._open(segment.url, index)
        self._next_index = index + 1
        raw = self._read()
        if raw is not None:
            for reason in raw.skipped:
                self.counts[reason] += 1
        if index == segment.count - 1 and raw is not None and self._read_extra():
            self.counts["shard_longer_than_sizes"] += 1
            self.warn("shard_longer_than_sizes", segment.url, self.counts)
        return raw

    def _open(self, url: str, index: int) -> None:
        self.close()
        self._url, self._broken = url, False
        kept = self.keep.get(url)
        self._it = iter_samples(url, self.wanted, self.cfg.max_member_bytes, skip=0 if kept else index,
                                retries=self.cfg.read_retries, positions=kept[index:] if kept else None)

    def _read(self) -> RawSample | None:
        if self._broken:
            self.counts["sample_missing"] += 1
            return None
        try:
            return next(self._it)
        except StopIteration:
            reason, detail = "shard_shorter_than_sizes", self._url
        except ShardError as err:
            reason, detail = err.reason, err.detail
        self._broken = True
        self.counts[reason] += 1
        self.counts["sample_missing"] += 1
        self.warn(reason, detail, self.counts)
        return None

    def _read_extra(self) -> bool:
        try:
            next(self._it)
            return True
        except (StopIteration, ShardError):
            return False
        finally:
            self._broken = True  # nothing more is planned from this shard

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None


class Loader:
    """One rank's loader: iterate for an epoch; ``state_dict`` / ``load_state_dict`` for exact resume."""

    def __init__(self, cfg: LoaderConfig, decoder: Decoder, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.sources = resolve_sources(cfg.train, cfg.weights or None, cfg.keep)
        self.workers = max(cfg.workers, 1)
        check_feasible(self.sources, cfg.mode, world_size * self.workers, cfg.batch_size)
        self.dataset = ShardStream(cfg, self.sources, decoder, rank, world_size)
        self.epoch, self.step = 0, 0
        self.wait_seconds = 0.0
        self.totals: Counter[str] = Counter()
        self._epoch_stats: dict[int, dict] = {}
        self._rings = RingReceiver()  # the workers' batch memory (data_pipeline.loader.batchring)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        plan = self.dataset.plan(self.rank * self.workers, self.world_size * self.workers)
        return len(plan.batch_sizes) * self.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.epoch, self.dataset.start_step = self.epoch, self.step
        # Its own generator: creating the iterator must not draw from the training process's global RNG (which
        # drives masking), or a resumed run would mask differently from the uninterrupted one.
        generator = torch.Generator().manual_seed(self.cfg.seed * 100003 + self.epoch)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.workers, generator=generator,
                            prefetch_factor=self.cfg.prefetch_factor if self.cfg.workers else None)
        self._epoch_stats = {}
        iterator = _start_workers(loader)
        _track_workers(iterator)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.wait_seconds += time.perf_counter() - started
            self._epoch_stats[batch.pop("_worker")] = batch.pop("_stats")
            batch = self._rings.unpack(batch)
            self.step += 1
            yield batch
        for stats in self._epoch_stats.values():
            self.totals.update(stats)
        self._epoch_stats = {}
        self.epoch, self.step = self.epoch + 1, 0

    def metrics(self) -> dict[str, float]:
        """Samples decoded, errors by reason (all epochs so far), seconds spent waiting for batches."""
        counts = Counter(self.totals)
        for stats in self._epoch_stats.values():
            counts.update(stats)
        return {**counts, "wait_seconds": round(self.wait_seconds, 3)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # once: a curated subset's positions can be millions of numbers
            shards = [(s.url, s.count) + ((s.keep,) if s.keep is not None else ())
                      for source in self.sources for s in source.shards]
            self._fingerprint = hashlib.sha256(repr(shards).encode()).hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "epoch": self.epoch, "step": self.step, "seed": cfg.seed, "mode": cfg.mode,
            "world_size": self.world_size, "workers": cfg.workers, "batch_size": cfg.batch_size,
            "shuffle_window": cfg.shuffle_window, "samples_per_epoch": cfg.samples_per_epoch,
            "weights": list(cfg.weights), "shards": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the plan must be the one that produced it, else resume is not exact."""
        mine = self.state_dict()
        differs = [k for k in mine if k not in ("epoch", "step") and state.get(k) != mine[k]]
        if differs:
            raise ValueError(
                "cannot resume the loader exactly: " + ", ".join(f"{k} was {state.get(k)!r}, now {mine[k]!r}" for k in differs))
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, image_transform: Callable | None = None,
                 tokenizer: Callable | None = None, image_size: int = 224, train: bool = True) -> Loader:
    """``train``: audio as training sees it (a random window, SpecAugment) or as evaluation does (all windows)."""
    return Loader(cfg, Decoder(cfg, image_transform, tokenizer, image_size, train), rank, world_size)
