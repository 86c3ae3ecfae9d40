"""Batch memory that loader workers lend to the training process and write again once it has been dropped.

A batch built in a worker reaches the training process through shared memory. Torch's way (``default_collate``)
maps a fresh segment for every batch: on these machines, faulting in a fresh 38 MB batch (64 images at 224 px)
costs ~27 ms, a sixth of a worker's time per batch, while writing over memory that is already mapped costs ~1.5 ms.
So each worker keeps a few segments (slots) and builds each batch tensor in a free one:

- the worker sends a slot's segment once (torch shares its file descriptor), after that only the slot's number;
- the training process wraps the slot in a tensor whose memory is *leased*: when the last tensor or view over it
  is freed, the lease ends and a byte in a table both processes map marks the slot free;
- the worker writes only into free slots. When none fits (the training process holds on to many batches), it
  takes a fresh segment as torch does, so holding batches never blocks anything or changes what a batch holds.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

FREE, LENT = 0, 1


@dataclass(frozen=True)
class _Lent:
    """A batch tensor that lives in a slot, as it travels to the training process."""

    slot: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


def fresh_shared(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor in a new shared-memory segment: sending it passes a file descriptor, not a copy of the data."""
    storage = torch.UntypedStorage._new_shared(math.prod(size) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(size)


class WorkerRing:
    """A worker's slots: ``empty`` allocates batch tensors in them, ``pack`` readies a batch for the trip."""

    @classmethod
    def in_this_worker(cls, prefetch_factor: int) -> "WorkerRing | None":
        """A ring for the calling DataLoader worker, or None in the training process itself (nothing to send)."""
        info = torch.utils.data.get_worker_info()
        # Room for the batches a worker has in flight (prefetched, being built, held by the training loop), each
        # with a few tensors.
        return cls(4 * (prefetch_factor + 2), info.id) if info is not None else None

    def __init__(self, max_slots: int, worker: int):
        self.worker = worker  # which of the training process's rings this is
        self._table = torch.zeros(max_slots, dtype=torch.uint8).share_memory_()
        self._state = self._table.numpy()
        self._slots: list[torch.UntypedStorage] = []
        self._announced = False  # whether the training process has the table
        self._sent: set[int] = set()  # slots whose segment the training process has
        self._pending: dict[int, int] = {}  # segment address -> slot, for slots taken since the last pack

    def empty(self, size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(size) * dtype.itemsize
        slot = self._take(nbytes) if _numpy_has(dtype) else None
        if slot is None:
            return fresh_shared(size, dtype)
        storage = self._slots[slot]
        self._pending[storage.data_ptr()] = slot
        return torch.empty(0, dtype=dtype).set_(storage, 0, size)

    def _take(self, nbytes: int) -> int | None:
        """The smallest free slot that holds ``nbytes`` without wasting half of itself, else a new one if allowed."""
        fits = [i for i, s in enumerate(self._slots) if self._state[i] == FREE and nbytes <= s.nbytes() <= 2 * nbytes]
        if fits:
            slot = min(fits, key=lambda i: self._slots[i].nbytes())
        elif nbytes and len(self._slots) < len(self._state):
            self._slots.append(torch.UntypedStorage._new_shared(nbytes))
            slot = len(self._slots) - 1
        else:
            return None
        self._state[slot] = LENT
        return slot

    def pack(self, batch: dict) -> dict:
        """Put each slot tensor's place in the batch (``_Lent``) where it was, and the trip's ``_Parcel`` under
        ``_ring``: the segments the training process has not seen yet, and the slot table the first time.

        Only a slot tensor that is a whole value of the batch and the only tensor anywhere in it (nested lists and
        dicts included) over its slot is lent. Any other slot taken since the last pack (left out, shared by two
        values, nested) stays marked lent for good: wherever its tensors went, the slot is never written again.
        """
        users = Counter(leaf.untyped_storage().data_ptr() for leaf in tree_leaves(batch)
                        if isinstance(leaf, torch.Tensor))
        segments: dict[int, torch.UntypedStorage] = {}
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                continue
            address = value.untyped_storage().data_ptr()
            slot = self._pending.get(address)
            if slot is None or users[address] != 1:
                continue
            batch[key] = _Lent(slot, tuple(value.shape), value.stride(), value.storage_offset(), value.dtype)
            if slot not in self._sent:
                segments[slot] = self._slots[slot]
                self._sent.add(slot)
        self._pending.clear()
        batch["_ring"] = _Parcel(self.worker, segments, None if self._announced else self._table)
        self._announced = True
        return batch


@dataclass(frozen=True)
class _Parcel:
    """What travels with a batch besides its values. Not a dict, so that DataLoader's pin_memory passes it by:
    pinning copies, and a copied segment would no longer see the worker's writes."""

    worker: int
    segments: dict[int, torch.UntypedStorage]
    table: torch.Tensor | None


class RingReceiver:
    """The training process's side, one per loader (not per iterator: a persistent worker announces its table
    only once): turns ``_Lent`` values back into leased tensors, in place."""

    def __init__(self):
        self._rings: dict[int, tuple[np.ndarray, dict[int, torch.UntypedStorage]]] = {}

    def unpack(self, batch: dict) -> dict:
        parcel = batch.pop("_ring", None)
        if parcel is None:
            return batch
        if parcel.table is not None:  # a new ring for this worker number: the old one's segments can go
            self._rings[parcel.worker] = (parcel.table.numpy(), {})
        state, segments = self._rings[parcel.worker]
        segments.update(parcel.segments)
        for key, value in batch.items():
            if isinstance(value, _Lent):
                batch[key] = _leased(segments[value.slot], value, state)
        return batch


@functools.cache
def _numpy_has(dtype: torch.dtype) -> bool:
    """Whether numpy can view this dtype (not bfloat16, for one): the lease goes through a numpy array."""
    try:
        torch.empty(0, dtype=dtype).numpy()
        return True
    except TypeError:
        return False


class _Lease:
    """Exposes a slot's memory to numpy; when the last array (and tensor) over it is gone, frees the slot."""

    def __init__(self, array: np.ndarray, state: np.ndarray, slot: int):
        self.__array_interface__ = array.__array_interface__
        self._array, self._state, self._slot = array, state, slot

    def __del__(self, free=FREE):  # bound now: at interpreter exit the module's globals may already be gone
        self._state[self._slot] = free


def _leased(storage: torch.UntypedStorage, lent: _Lent, state: np.ndarray) -> torch.Tensor:
    view = torch.empty(0, dtype=lent.dtype).set_(storage, lent.offset, lent.shape, lent.stride)
    # torch.from_numpy keeps the array, and so the lease, alive for as long as any tensor shares this memory.
    return torch.from_numpy(np.asarray(_Lease(view.numpy(), state, lent.slot)))
