"""Task data → batches in the loader's batch format, whatever the source.

Shards (``mmfuse shard`` output, task fields in the json member) stream through the training loader itself. The
standard files are read into records and decoded by the same ``Decoder``, so a batch always has ``image``,
``text``, ``audio`` with ``has_*`` masks, ``__key__``, and the task fields (``label``, ``captions``,
``question``, ``question_id``, ``answers``, ``image_id``):

- COCO captions JSON (``images`` + ``annotations``) with an image folder: one sample per image, every reference
  caption in ``captions``;
- VQA v2 questions JSON + annotations JSON with an image folder (COCO file names, or an ``images`` list);
- a class-per-folder image tree (``label`` = index of the sorted folder name);
- a CSV / JSONL / parquet manifest (``image``, ``text``, ``audio`` columns; other columns pass through).

Training order is a function of (seed, epoch); every rank gets the same number of batches; the position
(epoch, batch) is the resume state. Evaluation gives each rank a disjoint share of the samples, each sample once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Iterator

import numpy as np
import torch

from data_pipeline.loader.batchring import RingReceiver, WorkerRing
from data_pipeline.config import AudioFeatureConfig, FetchConfig, LoaderConfig
from data_pipeline.loader.decode import Decoder
from data_pipeline.errors import SampleError
from data_pipeline.shard.fetchers import Fetcher
from data_pipeline.text import decode_caption
from finetune.config import FinetuneConfig
from finetune.records import Record, detect_format, read_records  # noqa: F401 (the readers moved there; re-exported)
PREFETCH = 2  # batches each worker prepares ahead (the size of its batch ring follows)
TASK_FIELDS = ["label", "label_name", "question", "question_id", "question_type", "answer_type", "answers", "captions", "image_id"]


class RecordDataset(torch.utils.data.Dataset):
    """Records decoded by the loader's Decoder; a sample that fails to decode is counted and left out of its batch."""

    def __init__(self, records: list[Record], decoder: Decoder, prefetch_factor: int = 2):
        self.records, self.decoder, self.prefetch_factor = records, decoder, prefetch_factor
        self._ring: WorkerRing | None | bool = False  # made in each worker, on its first batch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        seed, epoch, index = item
        # Augmentation is a function of (seed, epoch, sample), not of which worker or resume saw it first.
        torch.manual_seed(int(np.random.default_rng([seed, epoch, index]).integers(2**62)))
        record = self.records[index]
        sample: dict[str, Any] = {"__key__": record.key, "meta": record.meta}
        try:
            if record.image:
                sample["image"] = self.decoder.decode_image(_read(record.image, self.decoder.cfg.max_member_bytes))
            if record.audio:
                sample.update(self.decoder.decode_clip(_read(record.audio, self.decoder.cfg.max_member_bytes)))
            text = decode_caption(record.text)[0] if record.text else ""
        except SampleError as err:
            return {"__error__": err.reason, "__key__": record.key}
        if text:
            sample["text"] = text
        return sample

    def collate(self, samples: list[dict | None]) -> dict[str, Any]:
        """In a worker, the batch tensors go into its ring (``data_pipeline.loader.batchring``); ``TaskData`` unpacks them."""
        if self._ring is False:
            self._ring = WorkerRing.in_this_worker(self.prefetch_factor)
        good = [s for s in samples if "__error__" not in s]
        batch = self.decoder.collate(good, self._ring.empty if self._ring else None)
        batch["__errors__"] = [s["__error__"] for s in samples if "__error__" in s]
        return self._ring.pack(batch) if self._ring else batch


def _read(location: str, limit: int) -> bytes:
    """The file's bytes, or SampleError with the sharding stage's reasons (file_not_found, not_a_file for a named
    pipe or device, which is never opened, too_large, read_error, ...)."""
    return _fetcher(limit).fetch(location)


@functools.lru_cache(maxsize=4)
def _fetcher(limit: int) -> Fetcher:
    """One per process (a loader worker makes its own): it holds per-thread http sessions, which do not pickle."""
    return Fetcher(FetchConfig(max_bytes=limit))


class BatchPlan(torch.utils.data.Sampler):
    """Batches of record indices for one rank: training shuffles by (seed, epoch) and pads by wrapping so every
    rank gets the same number of full batches; evaluation takes every world_size-th sample, in order."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, train: bool):
        self.n, self.batch_size, self.rank, self.world, self.seed, self.train = n, batch_size, rank, world, seed, train
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        if not self.train:
            return list(range(self.rank, self.n, self.world))
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        per_rank = -(-self.n // (self.world * self.batch_size)) * self.batch_size
        order = np.resize(order, per_rank * self.world)  # wraps around: the last batches repeat early samples
        return order[self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        mine = [(self.seed, self.epoch, i) for i in self.indices()]
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        yield from batches[self.start:]

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.batch_size)


class TaskData:
    """One split for one rank: ``for batch in data`` runs one epoch (training: from the resume position)."""

    def __init__(self, cfg: FinetuneConfig, split: str, rank: int, world: int, transform, tokenizer, image_size: int,
                 audio: AudioFeatureConfig):
        data = cfg.data
        self.path = data.train if split == "train" else data.eval
        self.train = split == "train"
        self.format = detect_format(self.path, data.format)
        loader_cfg = LoaderConfig(train=self.path, mode="exact", batch_size=data.batch_size, workers=data.workers,
                                  seed=data.seed, shuffle_window=data.shuffle_window if self.train else 1,
                                  members=dataclasses.replace(data.members, task_fields=TASK_FIELDS),
                                  audio=audio)
        decoder = Decoder(loader_cfg, transform, tokenizer, image_size, train=self.train)
        self.epoch, self.step = 0, 0
        self.rings = RingReceiver()  # the workers' batch memory (data_pipeline.loader.batchring)
        if self.format == "shards":
            from data_pipeline.loader import Loader

            self.loader = Loader(loader_cfg, decoder, rank, world)
            self.plan = None
        else:
            images = data.train_images if self.train else data.eval_images
            annotations = data.train_annotations if self.train else data.eval_annotations
            self.records = read_records(self.path, self.format, images, annotations, data.image_template)
            dataset = RecordDataset(self.records, decoder, prefetch_factor=PREFETCH)
            self.plan = BatchPlan(len(self.records), data.batch_size, rank, world, data.seed, self.train)
            self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=self.plan, collate_fn=dataset.collate,
                                                      num_workers=data.workers, persistent_workers=False,
                                                      prefetch_factor=PREFETCH if data.workers else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.plan is None:
            for batch in self.loader:
                self.epoch, self.step = self.loader.epoch, self.loader.step
                yield batch
            self.epoch, self.step = self.loader.epoch, self.loader.step
            return
        if not self.train:
            self.step = 0  # evaluation always covers the whole split
        self.plan.epoch, self.plan.start = self.epoch, self.step
        for batch in self.loader:
            self.step += 1
            yield self.rings.unpack(batch)
        if self.train:
            self.epoch, self.step = self.epoch + 1, 0

    def forever(self) -> Iterator[dict[str, Any]]:
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        if self.plan is None:
            return {"loader": self.loader.state_dict()}
        return {"epoch": self.epoch, "step": self.step, "samples": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.plan is None:
            self.loader.load_state_dict(state["loader"])
            return
        if state["samples"] != len(self.records):
            raise ValueError(f"cannot resume exactly: the training data had {state['samples']} samples, now {len(self.records)}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def metas(self) -> list[dict]:
        """Every sample's task fields (class names, answer vocabularies), read without decoding any media."""
        if self.plan is not None:
            return [r.meta for r in self.records]
        from data_pipeline.loader.sources import resolve_sources
        from data_pipeline.loader.tarstream import iter_samples

        found = []
        for source in resolve_sources(self.path):
            for shard in source.shards:
                for raw in iter_samples(shard.url, {"json"}, 1 << 20):
                    meta = json.loads(raw.members.get("json", b"{}"))
                    found.append(meta if isinstance(meta, dict) else {})
        return found
