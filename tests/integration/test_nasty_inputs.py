"""Issue 20: the bad-input zoo (tests/datagen.py) through the training loader and every fine-tune reader.

Sharding has its own zoo test (test_shard_pipeline.py). Here the same files reach the readers that take raw or
foreign data: a WebDataset shard made elsewhere with the zoo's bytes as members (the pre-training loader, and the
zeroshot / classify shard path), and fine-tuning's manifest, COCO captions, VQA and class-folder readers. In each:
no crash, no hang (a named pipe is among the inputs), every good sample decoded, every bad one counted by reason.
"""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision import transforms

from data_pipeline.config import AudioFeatureConfig, LoaderConfig
from data_pipeline.loader import build_loader
from finetune.config import FinetuneConfig
from finetune.data import TaskData
from mmfuse.config import load_config
from tests.datagen import bad_input_zoo, write_manifest
from tests.loaderdata import write_tar

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

AUDIO = AudioFeatureConfig(n_mels=8, frames=10)
# The model's transform in miniature: resize, crop, ToTensor + Normalize (the loader's batched fast path).
TRANSFORM = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16), transforms.ToTensor(),
                                transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
# What fails when an image file is read and decoded for the model (no resize to store, so no tiny-image guard).
IMAGE_FILE_FAILURES = {"image_decode_error": 4, "empty_file": 1, "image_too_large": 1, "file_not_found": 1,
                       "bad_aspect_ratio": 4, "not_a_file": 3, "bad_path": 1}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    rows, _ = bad_input_zoo(root)
    return root, rows


def image_path(root: Path, row: dict) -> str | None:
    return None if row["image"] is None else row["image"] if row["image"].startswith("/") else str(root / row["image"])


def regular_bytes(path: str | None) -> bytes | None:
    """The file's bytes if it is a regular file (the members a foreign shard writer would have stored)."""
    if path is None or "\0" in path or not os.path.isfile(path):
        return None
    return Path(path).read_bytes()


def task_data(path: Path, **data) -> TaskData:
    overrides = {"task": "classify", "checkpoint": "c", "run.dir": "r", "data.eval": path, "data.batch_size": 5,
                 "data.workers": 0, **{f"data.{k}": v for k, v in data.items()}}
    cfg = load_config(FinetuneConfig, overrides=[f"{k}={v}" for k, v in overrides.items()])
    return TaskData(cfg, "eval", 0, 1, TRANSFORM, None, image_size=16, audio=AUDIO)


def run_records(data: TaskData) -> tuple[list[str], Counter]:
    keys, errors = [], Counter()
    for batch in data:
        keys += batch["__key__"]
        errors.update(batch["__errors__"])
        assert batch["image"].shape[1:] == (3, 16, 16) and torch.isfinite(batch["image"]).all()
    return keys, errors


@pytest.fixture(scope="module")
def foreign_shards(zoo, tmp_path_factory):
    """A dataset another tool wrote from the zoo rows, bytes unchecked: every image as .jpg whatever it is."""
    root, rows = zoo
    out = tmp_path_factory.mktemp("foreign")
    samples = []
    for i, row in enumerate(rows):
        sample = {"__key__": f"zoo{i:04d}", "txt": row["text"], "json": json.dumps({"label": i % 3}).encode()}
        image = regular_bytes(image_path(root, row))
        if image is not None:
            sample["jpg"] = image
        if row["audio"]:
            sample["wav"] = (root / row["audio"]).read_bytes()
        samples.append(sample)
    write_tar(out / "shard-000000.tar", samples)
    (out / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(samples)}))
    return out, len(samples)


# In a foreign shard, a missing or special file is simply an absent member: those rows are text-only samples.
FOREIGN_FAILURES = {"image_decode_error": 5, "image_too_large": 1, "bad_aspect_ratio": 4, "audio_empty": 1,
                    "audio_decode_error": 1, "audio_nan": 1}


def test_training_loader_counts_foreign_bad_members_by_reason(foreign_shards):
    out, total = foreign_shards
    cfg = load_config(LoaderConfig, [], [f"train={out}", "batch_size=5", "workers=1", "shuffle_window=4"])
    loader = build_loader(cfg, image_transform=TRANSFORM, image_size=16)
    keys = [k for batch in loader for k in batch["__key__"]]
    metrics = loader.metrics()
    failures = {k: v for k, v in metrics.items() if k not in ("samples", "wait_seconds")}
    assert failures == FOREIGN_FAILURES
    assert metrics["samples"] == len(keys) == total - sum(FOREIGN_FAILURES.values())


def test_zeroshot_and_classify_shards_count_bad_members(foreign_shards):
    out, total = foreign_shards
    data = task_data(out)
    assert data.format == "shards"
    keys = [k for batch in data for k in batch["__key__"]]
    metrics = data.loader.metrics()
    assert {k: v for k, v in metrics.items() if k not in ("samples", "wait_seconds")} == FOREIGN_FAILURES
    assert len(keys) == total - sum(FOREIGN_FAILURES.values())


def test_finetune_manifest_reader(zoo):
    root, rows = zoo
    data = task_data(write_manifest(root / "zoo_manifest.parquet", rows))
    keys, errors = run_records(data)
    expected = Counter(IMAGE_FILE_FAILURES) + Counter({"text_not_utf8": 1, "audio_empty": 1, "audio_decode_error": 1,
                                                        "audio_nan": 1})
    assert errors == expected
    assert len(keys) == len(rows) - sum(expected.values())
    # The caption with NULs and escapes is kept, cleaned.
    dirty = next(i for i, r in enumerate(data.records) if (r.image or "").endswith("dirty.jpg"))
    assert data.loader.dataset[(0, 0, dirty)]["text"] == "a [1mred[0m kite"


def coco_from_zoo(root: Path, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    images, annotations = [], []
    for i, row in enumerate(r for r in rows if r["image"]):
        images.append({"id": i, "file_name": row["image"]})
        annotations.append({"id": i, "image_id": i, "caption": row["text"].decode("utf-8", "replace")})
    return images, annotations


def test_finetune_coco_captions_reader(zoo):
    root, rows = zoo
    images, annotations = coco_from_zoo(root, rows)
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    data = task_data(root / "coco.json")
    assert data.format == "coco"
    keys, errors = run_records(data)
    assert errors == IMAGE_FILE_FAILURES
    assert len(keys) == len(images) - sum(IMAGE_FILE_FAILURES.values())


def test_finetune_vqa_reader(zoo):
    root, rows = zoo
    images, _ = coco_from_zoo(root, rows)
    questions = [{"question_id": 100 + im["id"], "image_id": im["id"], "question": "what is it?"} for im in images]
    answers = [{"question_id": q["question_id"], "answers": [{"answer": "thing"}] * 10} for q in questions]
    (root / "vqa_q.json").write_text(json.dumps({"questions": questions, "images": images}))
    (root / "vqa_a.json").write_text(json.dumps({"annotations": answers}))
    data = task_data(root / "vqa_q.json", eval_annotations=root / "vqa_a.json")
    assert data.format == "vqa"
    keys, errors = run_records(data)
    assert errors == IMAGE_FILE_FAILURES
    assert len(keys) == len(questions) - sum(IMAGE_FILE_FAILURES.values())


@pytest.mark.timeout(120)  # a named pipe in the tree: opening it would block forever
def test_finetune_class_folder_reader(zoo, tmp_path):
    root, rows = zoo
    tree = tmp_path / "classes"
    for i, path in enumerate(sorted({image_path(root, r) for r in rows if r["image"]})):
        target = tree / ("odd" if i % 2 else "even") / f"{i:02d}.jpg"  # every kind under a name the reader takes
        target.parent.mkdir(parents=True, exist_ok=True)
        if regular_bytes(path) is not None:
            shutil.copyfile(path, target)
        elif path.endswith("pipe.jpg"):
            os.mkfifo(target)
        elif path == "/dev/null" or path.endswith("missing.jpg"):
            target.symlink_to(path)  # a device, and a dangling link
    data = task_data(tree)
    assert data.format == "folder"
    keys, errors = run_records(data)
    # No folder or NUL path can sit in a class tree: those two kinds drop out.
    expected = Counter(IMAGE_FILE_FAILURES) - Counter({"not_a_file": 1, "bad_path": 1})
    assert errors == expected
    assert len(keys) == len(data.records) - sum(expected.values())
