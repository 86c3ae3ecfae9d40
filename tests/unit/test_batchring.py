"""Batch memory lent by a loader worker: a slot is written again only after every tensor over it is gone."""

import gc

import torch

from data_pipeline.loader.batchring import FREE, LENT, RingReceiver, WorkerRing


def trip(ring: WorkerRing, receiver: RingReceiver, **tensors) -> dict:
    """What the loader does around the process boundary, in one process (the memory is shared either way)."""
    batch = {"__key__": ["a"], **tensors}
    return receiver.unpack(ring.pack(batch))


def slot_states(ring: WorkerRing) -> list[int]:
    return ring._state[: len(ring._slots)].tolist()


def test_a_slot_is_written_again_only_after_every_view_of_its_tensor_is_gone():
    ring, receiver = WorkerRing(max_slots=4, worker=0), RingReceiver()
    x = ring.empty((2, 3), torch.float32)
    x.copy_(torch.arange(6.0).view(2, 3))
    first_address = x.data_ptr()
    batch = trip(ring, receiver, x=x)
    del x
    received = batch["x"]
    assert received.shape == (2, 3) and torch.equal(received, torch.arange(6.0).view(2, 3))
    assert "_ring" not in batch and slot_states(ring) == [LENT]

    row = received[1]  # a view outlives the batch and the tensor it came from
    del batch, received
    gc.collect()
    assert slot_states(ring) == [LENT]
    other = ring.empty((2, 3), torch.float32).fill_(-1)
    assert other.data_ptr() != first_address  # a second slot, not the viewed one
    assert row.tolist() == [3.0, 4.0, 5.0]
    kept = trip(ring, receiver, x=other)["x"]

    del row
    assert slot_states(ring) == [FREE, LENT]
    assert ring.empty((2, 3), torch.float32).data_ptr() == first_address  # the freed slot is written again
    assert kept.tolist() == [[-1.0] * 3] * 2


def test_with_every_slot_lent_batches_go_to_fresh_memory_and_keep_their_values():
    ring, receiver = WorkerRing(max_slots=2, worker=0), RingReceiver()
    held = []
    for value in range(5):
        x = ring.empty((4,), torch.float32).fill_(value)
        held.append(trip(ring, receiver, x=x))
    assert slot_states(ring) == [LENT, LENT]
    assert [b["x"].tolist() for b in held] == [[float(v)] * 4 for v in range(5)]
    assert sum(1 for b in held if isinstance(b["x"], torch.Tensor) and b["x"].is_shared()) == 3  # the fallbacks


def test_a_slot_is_taken_only_for_a_tensor_of_about_its_size():
    ring, receiver = WorkerRing(max_slots=4, worker=0), RingReceiver()
    big = ring.empty((100,), torch.float32)
    del trip(ring, receiver, big=big)["big"], big
    assert slot_states(ring) == [FREE]
    small = ring.empty((10,), torch.float32)  # 40 bytes would waste most of the 400-byte slot: a new slot
    assert len(ring._slots) == 2 and small.untyped_storage().nbytes() == 40


def test_a_slot_tensor_left_out_of_its_batch_or_shared_by_two_values_is_never_written_again():
    ring, receiver = WorkerRing(max_slots=4, worker=0), RingReceiver()
    kept = ring.empty((3,), torch.float32).fill_(7)
    trip(ring, receiver)  # the batch does not carry it: it may have gone anywhere
    shared = ring.empty((3,), torch.float32).fill_(5)
    both = trip(ring, receiver, x=shared, first=shared[:1])  # two values over one slot: neither is leased
    assert both["x"].tolist() == [5.0, 5.0, 5.0]
    del shared, both["x"]  # "first" still looks at the slot
    for _ in range(3):
        del trip(ring, receiver, x=ring.empty((3,), torch.float32).zero_())["x"]
    assert kept.tolist() == [7.0, 7.0, 7.0] and slot_states(ring)[:2] == [LENT, LENT]
    assert both["first"].tolist() == [5.0]


def test_dtypes_numpy_cannot_view_take_fresh_memory():
    ring = WorkerRing(max_slots=4, worker=0)
    x = ring.empty((3,), torch.bfloat16)
    assert x.is_shared() and not ring._slots


def test_a_slot_tensor_also_seen_inside_a_nested_value_is_not_lent():
    ring, receiver = WorkerRing(max_slots=4, worker=0), RingReceiver()
    x = ring.empty((3,), torch.float32).fill_(2)
    batch = trip(ring, receiver, x=x, crops=[{"first": x[:1]}])  # a view of the slot inside a list of dicts
    del x, batch["x"]
    gc.collect()
    for _ in range(3):
        del trip(ring, receiver, x=ring.empty((3,), torch.float32).zero_())["x"]
    assert batch["crops"][0]["first"].tolist() == [2.0] and slot_states(ring)[0] == LENT


def test_unpacked_values_keep_their_place_in_the_batch():
    ring, receiver = WorkerRing(max_slots=4, worker=0), RingReceiver()
    batch = {"image": ring.empty((2,), torch.float32), "__key__": ["a", "b"], "mask": ring.empty((2,), torch.bool)}
    assert list(receiver.unpack(ring.pack(batch))) == ["image", "__key__", "mask"]


def test_pin_memory_passes_the_ring_parcel_by_without_copying_its_segments():
    from torch.utils.data._utils.pin_memory import pin_memory

    ring = WorkerRing(max_slots=4, worker=0)
    packed = ring.pack({"__key__": ["a"], "x": ring.empty((3,), torch.float32)})
    pinned = pin_memory(packed)  # with no other tensor in the batch, this runs without a GPU
    assert pinned["_ring"] is packed["_ring"] and pinned["x"] is packed["x"]


class Batches(torch.utils.data.Dataset):
    """Each batch of ``value`` written into the worker's ring, as ``finetune.data.RecordDataset`` does."""

    def __init__(self):
        self.ring = None

    def __len__(self):
        return 6

    def __getitem__(self, value):
        return value

    def collate(self, values):
        self.ring = self.ring or WorkerRing.in_this_worker(prefetch_factor=2)
        return self.ring.pack({"x": self.ring.empty((len(values), 1000), torch.float32).copy_(
            torch.tensor(values, dtype=torch.float32)[:, None].expand(-1, 1000))})


def test_a_persistent_worker_keeps_lending_into_the_next_epoch():
    dataset = Batches()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, persistent_workers=True,
                                         collate_fn=dataset.collate)
    receiver = RingReceiver()  # one per loader: the worker announces its table only in the first epoch
    for _ in range(2):
        seen = [receiver.unpack(batch)["x"][:, 0].tolist() for batch in loader]
        assert seen == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
