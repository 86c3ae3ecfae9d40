"""The streaming loader over real shards with real DataLoader worker processes."""

import json
import os
import re
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from data_pipeline.config import LoaderConfig
from data_pipeline.loader import build_loader
from mmfuse.config import load_config
from tests.loaderdata import make_dataset, sample, write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def config(train, *overrides):
    return load_config(LoaderConfig, [], [f"train={train}", "batch_size=4", "workers=2", "shuffle_window=6", *overrides])


def epoch_keys(cfg, world_size=2, epochs=1):
    """Keys per (epoch, rank) in batch order, with the loaders."""
    loaders = [build_loader(cfg, rank, world_size) for rank in range(world_size)]
    out = []
    for _ in range(epochs):
        out.append([[b["__key__"] for b in loader] for loader in loaders])
    return out, loaders


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "eight", shards=8, per_shard=10, counts=[10, 10, 10, 10, 10, 10, 10, 9])


def test_exact_mode_every_key_once_per_epoch(eight_shards):
    cfg = config(eight_shards)
    (first, second), loaders = epoch_keys(cfg, epochs=2)
    all_keys = {f"shard{s:03d}{i:04d}" for s in range(8) for i in range(10 if s < 7 else 9)}
    for epoch in (first, second):
        keys = [k for rank in epoch for batch in rank for k in batch]
        assert Counter(keys) == Counter(all_keys)
        assert len(epoch[0]) == len(epoch[1]) == len(loaders[0])  # every rank the same number of batches
    assert first != second  # a new order every epoch
    again, _ = epoch_keys(cfg, epochs=1)
    assert again[0] == first  # same seed, same order


def test_resume_mid_epoch_in_a_new_loader_is_exact(eight_shards):
    cfg = config(eight_shards)
    uninterrupted = [b["__key__"] for b in build_loader(cfg, 1, 2)]
    loader = build_loader(cfg, 1, 2)
    seen = []
    for batch in loader:
        seen.append(batch["__key__"])
        if len(seen) == 3:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # plain data: survives a checkpoint
    assert state["step"] == 3
    resumed = build_loader(cfg, 1, 2)
    resumed.load_state_dict(state)
    rest = [b["__key__"] for b in resumed]
    assert rest[0] == uninterrupted[3]  # the next batch is identical
    assert seen + rest == uninterrupted  # nothing seen twice, nothing skipped
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["step"] == 0


def test_resume_refuses_a_different_plan(eight_shards):
    state = build_loader(config(eight_shards), 0, 2).state_dict()
    with pytest.raises(ValueError, match="world_size was 2, now 1"):
        build_loader(config(eight_shards), 0, 1).load_state_dict(state)


def test_fewer_shards_than_slots_still_exact(tmp_path):
    data = make_dataset(tmp_path / "two", shards=2, per_shard=12)
    cfg = config(data, "workers=3")
    (epoch,), _ = epoch_keys(cfg)
    keys = [k for rank in epoch for batch in rank for k in batch]
    assert sorted(keys) == sorted(f"shard{s:03d}{i:04d}" for s in range(2) for i in range(12))


def test_too_little_data_is_an_error_at_construction(tmp_path):
    data = make_dataset(tmp_path / "tiny", shards=1, per_shard=3)
    with pytest.raises(ValueError, match="at least one sample per loader slot"):
        build_loader(config(data, "workers=2"), 0, 2)
    with pytest.raises(ValueError, match="no shards|neither"):
        build_loader(config(tmp_path / "nothing-here"), 0, 1)


def test_resampled_mixing_follows_weights(tmp_path):
    names = [make_dataset(tmp_path / n, shards=3, per_shard=8, prefix=n) for n in ("a", "b", "c")]
    cfg = config("::".join(map(str, names)), "mode=resampled", "weights=[1,1,2]", "samples_per_epoch=2400",
                 "batch_size=16", "shuffle_window=8", "workers=1")
    loader = build_loader(cfg, 0, 1)
    counts = Counter(k[0] for batch in loader for k in batch["__key__"])
    total = sum(counts.values())
    assert total == 2400 and len(loader) == 150
    observed = [counts["a"], counts["b"], counts["c"]]
    # Whole shards (8 samples) are drawn, so test the number of shard draws.
    draws = np.array(observed) / 8
    assert chisquare(draws, f_exp=np.array([0.25, 0.25, 0.5]) * draws.sum()).pvalue > 0.001


def test_corrupt_data_is_skipped_and_counted(tmp_path):
    root = tmp_path / "corrupt"
    root.mkdir()
    good = [sample(f"g{i:03d}", i) for i in range(8)]
    bad_jpeg = sample("bad000", 99)
    bad_jpeg["jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    no_text = {k: v for k, v in sample("notxt0", 98).items() if k not in ("txt", "jpg")}  # only json
    write_tar(root / "s-000000.tar", good[:4] + [bad_jpeg, no_text])
    write_tar(root / "s-000001.tar", good[4:])
    data = (root / "s-000001.tar").read_bytes()
    (root / "s-000001.tar").write_bytes(data[: len(data) * 2 // 3])  # truncated mid-shard
    (root / "sizes.json").write_text(json.dumps({"s-000000.tar": 6, "s-000001.tar": 4}))
    cfg = config(root, "workers=1", "batch_size=3")
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    keys = [k for b in batches for k in b["__key__"]]
    metrics = loader.metrics()
    assert len(batches) == len(loader) == 4  # the batch count does not change
    assert metrics["image_decode_error"] == 1 and metrics["no_modality"] == 1
    assert metrics["shard_truncated"] == 1
    assert metrics["samples"] == len(keys) == 10 - 2 - metrics["sample_missing"]
    assert set(keys) <= {f"g{i:03d}" for i in range(8)}


def test_members_too_large_are_skipped_unread(tmp_path):
    data = make_dataset(tmp_path / "d", shards=1, per_shard=4)
    loader = build_loader(config(data, "workers=0", "max_member_bytes=200"), 0, 1)
    batches = list(loader)
    assert loader.metrics()["member_too_large"] == 4  # every jpg is over 200 bytes
    assert not any(b["has_image"].any() for b in batches) and all(b["has_text"].all() for b in batches)


def test_presence_masks_and_task_fields(tmp_path):
    data = make_dataset(tmp_path / "d", shards=2, per_shard=6, audio_every=2)
    loader = build_loader(config(data, "workers=0", "batch_size=12", "audio.frames=40"), 0, 1)
    (batch,) = list(loader)
    assert batch["has_audio"].sum() == 6 and batch["has_image"].all()
    assert batch["audio"].shape == (12, 64, 40) and batch["audio_mask"].shape == (12, 40)
    assert (batch["audio"][~batch["has_audio"]] == 0).all()
    assert batch["audio_mask"][batch["has_audio"]].any(dim=1).all()
    assert batch["label"].tolist() == [(int(k[5:8]) * 1000 + int(k[8:])) % 5 for k in batch["__key__"]]
    required = build_loader(config(data, "workers=0", "batch_size=6", "require=[audio]", "audio.frames=40"), 0, 1)
    kept = [k for b in required for k in b["__key__"]]
    assert len(kept) == 6 and required.metrics()["missing_audio"] == 6


@pytest.mark.timeout(120)
def test_workers_run_at_the_configured_lower_priority(eight_shards):
    import psutil

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    loader = build_loader(LoaderConfig(train=str(eight_shards), batch_size=4, workers=2, worker_nice=7))
    iterator = iter(loader)
    next(iterator)
    workers = [child for child in me.children() if child.pid not in before]
    niceness = [worker.nice() for worker in workers]
    del iterator
    assert niceness == [min(me.nice() + 7, 19)] * 2  # 19 is the lowest priority there is


def test_workers_start_with_sigterm_held_back_and_the_loop_does_not(eight_shards):
    import psutil

    def blocks_sigterm(pid):
        status = Path(f"/proc/{pid}/status").read_text()
        return bool(int(re.search(r"SigBlk:\s*([0-9a-f]+)", status).group(1), 16) & (1 << (signal.SIGTERM - 1)))

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    iterator = iter(build_loader(LoaderConfig(train=str(eight_shards), batch_size=4, workers=2)))
    next(iterator)
    workers = [child.pid for child in me.children() if child.pid not in before]
    assert len(workers) == 2 and all(blocks_sigterm(pid) for pid in workers)  # a stop never kills one as it starts
    assert not blocks_sigterm(os.getpid())  # the training process still gets it
    del iterator


def test_workers_write_batches_again_only_into_memory_the_loop_has_dropped(tmp_path):
    data = make_dataset(tmp_path / "d", shards=4, per_shard=10, audio_every=3)
    cfg = config(data, "batch_size=2", "audio.frames=40")  # 2 workers, prefetch_factor 2: 20 batches
    tensors = ("image", "audio", "audio_mask", "text")

    addresses, copies = [], []
    for batch in build_loader(cfg, 0, 1):  # each batch dropped before the next: workers reuse their slots
        addresses.append(batch["image"].data_ptr())
        copies.append({name: batch[name].clone() for name in tensors if name in batch})
    assert len(copies) == 20 and len(set(addresses)) <= 2 * (2 + 2)  # slots per worker: prefetched + built + held

    held = list(build_loader(cfg, 0, 1))  # every batch kept: slots run out, later ones take fresh memory
    for batch, copy in zip(held, copies, strict=True):
        assert all(torch.equal(batch[name], copy[name]) for name in copy)  # nothing written over a kept batch
    assert held[0]["audio"][held[0]["has_audio"]].abs().sum() > 0
