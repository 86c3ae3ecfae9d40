"""The epoch plan: which samples each (rank, worker) slot reads, in which order, cut into which batches.

Everything is a pure function of (sources, seed, epoch, world size, workers, batch size), so any process can
recompute any slot's plan, and a position is just "batches consumed".

exact
    The epoch's shard order is a permutation drawn from (seed, epoch); the concatenated stream of N samples is cut
    into S = world_size x workers contiguous ranges of floor/ceil(N/S) samples (slots may split a shard, so fewer
    shards than slots is fine). Each slot shuffles its range in windows of ``shuffle_window`` samples with an RNG
    drawn from (seed, epoch, slot, window) and emits the same number of batches b = ceil(ceil(N/S)/B); only the
    last batch of a slot may be short. Every sample is read exactly once per epoch.
resampled
    Each slot draws shards with replacement: a dataset by weight, then a shard uniformly within it, from an RNG
    drawn from (seed, epoch, slot), and takes the first b x B samples of that stream, b = ceil(ceil(E/S)/B) for
    E samples per epoch.

PyTorch's DataLoader takes batches from its workers round-robin, so worker w of a rank delivers that rank's
batches w, w+W, w+2W, ...: with equal batch counts per slot, every rank sees the same number of batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data_pipeline.loader.sources import Source


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of one shard holding ``count`` samples (by sizes.json)."""

    url: str
    start: int
    stop: int
    count: int


@dataclass(frozen=True)
class SlotPlan:
    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]
    window: int
    rng_key: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(s.stop - s.start for s in self.segments)

    def window_order(self, index: int, size: int) -> np.ndarray:
        """The permutation of window ``index`` (``size`` samples), the same in every process."""
        return np.random.default_rng([*self.rng_key, index]).permutation(size)


def batches_per_slot(samples_per_slot: int, batch_size: int) -> int:
    return math.ceil(samples_per_slot / batch_size)


def slot_plan(sources: list[Source], mode: str, seed: int, epoch: int, slot: int, slots: int, batch_size: int,
              window: int, samples_per_epoch: int = 0) -> SlotPlan:
    if mode == "exact":
        return _exact(sources, seed, epoch, slot, slots, batch_size, window)
    return _resampled(sources, seed, epoch, slot, slots, batch_size, window, samples_per_epoch)


def check_feasible(sources: list[Source], mode: str, slots: int, batch_size: int) -> None:
    """Fail at construction, with what to change, when the plan cannot give every slot a batch."""
    total = sum(s.samples for s in sources)
    if total == 0:
        raise ValueError("the datasets hold no samples")
    if mode == "exact" and total < slots:
        raise ValueError(
            f"exact mode needs at least one sample per loader slot: {total} samples for {slots} slots "
            f"(ranks x workers); use fewer workers or ranks, or mode=resampled")
    if mode == "exact":
        per_slot = total // slots
        if per_slot < batches_per_slot(math.ceil(total / slots), batch_size):
            raise ValueError(f"{total} samples cannot fill equal batch counts over {slots} slots; use fewer workers")


def _exact(sources, seed, epoch, slot, slots, batch_size, window) -> SlotPlan:
    shards = [shard for source in sources for shard in source.shards]
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(shards))
    total = sum(s.count for s in shards)
    start, stop = slot * total // slots, (slot + 1) * total // slots
    segments, offset = [], 0
    for index in order:
        shard = shards[index]
        lo, hi = max(start, offset), min(stop, offset + shard.count)
        if lo < hi:
            segments.append(Segment(shard.url, lo - offset, hi - offset, shard.count))
        offset += shard.count
        if offset >= stop:
            break
    count = stop - start
    batches = batches_per_slot(math.ceil(total / slots), batch_size)
    return SlotPlan(tuple(segments), _batch_sizes(count, batches, batch_size), window, (seed, epoch, slot, 1))


def _batch_sizes(count: int, batches: int, batch_size: int) -> tuple[int, ...]:
    """Full batches, then the remainder; if that leaves an empty last batch, spread the count evenly."""
    last = count - (batches - 1) * batch_size
    if last >= 1:
        return (batch_size,) * (batches - 1) + (last,)
    q, r = divmod(count, batches)
    return (q + 1,) * r + (q,) * (batches - r)


def _resampled(sources, seed, epoch, slot, slots, batch_size, window, samples_per_epoch) -> SlotPlan:
    epoch_samples = samples_per_epoch or sum(s.samples for s in sources)
    batches = batches_per_slot(math.ceil(epoch_samples / slots), batch_size)
    wanted = batches * batch_size
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, slot, 2])
    segments, taken = [], 0
    while taken < wanted:
        source = sources[rng.choice(len(sources), p=weights / weights.sum())]
        shard = source.shards[rng.integers(len(source.shards))]
        take = min(shard.count, wanted - taken)
        if take:
            segments.append(Segment(shard.url, 0, take, shard.count))
        taken += take
    return SlotPlan(tuple(segments), (batch_size,) * batches, window, (seed, epoch, slot, 3))


def windows(plan: SlotPlan) -> Iterator[list[tuple[Segment, int]]]:
    """The slot's stream as windows of (segment, sample index within the shard), in reading order."""
    current: list[tuple[Segment, int]] = []
    for segment in plan.segments:
        for index in range(segment.start, segment.stop):
            current.append((segment, index))
            if len(current) == plan.window:
                yield current
                current = []
    if current:
        yield current
