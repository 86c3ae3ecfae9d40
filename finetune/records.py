"""The samples of the standard task files, as records (paths and task fields; nothing decoded), and the format
checks that run before any process starts. No torch here: ``mmfuse finetune`` / ``mmfuse eval`` check their data
in about a second.

- COCO captions JSON (``images`` + ``annotations``) with an image folder: one sample per image, every reference
  caption in ``captions``;
- VQA v2 questions JSON + annotations JSON with an image folder: the ``images`` list's file names, else
  ``data.image_template`` (COCO's naming when the JSON has a ``data_subtype``);
- a class-per-folder image tree (``label`` = index of the sorted folder name);
- a CSV / JSONL / parquet manifest (``image``, ``text``, ``audio`` columns; other columns pass through).
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

from mmfuse.storage import filesystem

from mmfuse.redact import redact, redact_text
from finetune.config import FinetuneConfig

log = logging.getLogger("mmfuse.finetune")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
COCO_IMAGE_TEMPLATE = "{subtype}/COCO_{subtype}_{image_id:012d}.jpg"


@dataclass
class Record:
    """One sample of a standard file, before decoding."""

    key: str
    image: str | None = None
    audio: str | None = None
    text: str | bytes | None = None
    """As the file has it: checked (UTF-8, control characters) when the sample is read, so a bad one fails alone."""
    meta: dict[str, Any] = field(default_factory=dict)


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    fs, inner = filesystem(path)
    lower = inner.lower()
    if "{" in lower or "::" in lower:
        return "shards"
    if not fs.exists(inner):
        raise ValueError(f"data {redact(path)!r} does not exist")
    if lower.endswith(".tar"):
        return "shards"
    if fs.isdir(inner):
        shards = fs.exists(posixpath.join(inner, "sizes.json")) or bool(fs.glob(posixpath.join(inner, "*.tar")))
        return "shards" if shards else "folder"  # a folder of tars: img2dataset's output
    if lower.endswith(".json"):
        head = json.loads(fs.cat_file(inner))
        if isinstance(head, dict) and "questions" in head:
            return "vqa"
        if isinstance(head, dict) and "annotations" in head and "images" in head:
            return "coco"
    if lower.endswith((".csv", ".tsv", ".jsonl", ".parquet", ".jsonl.gz", ".csv.gz")):
        return "manifest"
    raise ValueError(f"cannot tell the format of {redact(path)!r}; set data.format to shards, coco, vqa, folder or manifest")


def check_data(cfg: FinetuneConfig, train: bool) -> None:
    """Every split of the run exists, has a readable format and names media files that exist: a few of each
    split's files are looked up (all of them missing is an error, before any process starts)."""
    from data_pipeline.preflight import PreflightError, check_credentials, check_dataset, check_input, reason

    data = cfg.data
    if train and not data.train:
        raise PreflightError(f"data.train is empty, but task {cfg.task} trains for run.steps={cfg.run.steps} steps (set "
                             "data.train, or evaluate only with mmfuse eval)")
    splits = [("data.eval", data.eval, data.format, data.eval_images, data.eval_annotations)]
    if train:
        splits.insert(0, ("data.train", data.train, data.format, data.train_images, data.train_annotations))
    if cfg.retention.data:
        splits.append(("retention.data", cfg.retention.data, "auto", "", ""))
    for key, path, configured, images, annotations in splits:
        check_credentials(key, path)
        try:
            fmt = detect_format(path, configured)
        except (ValueError, OSError) as err:
            raise PreflightError(f"{key}: {err}") from None
        if fmt == "shards":
            check_dataset(key, path)
            continue
        if fmt == "vqa":
            if not annotations:
                raise PreflightError(f"{key}: VQA questions {redact(path)!r} need their annotations JSON ({key}_annotations)")
            check_input(f"{key}_annotations", annotations)
        try:
            records = read_records(path, fmt, images, annotations, data.image_template)
        except (ValueError, KeyError, OSError) as err:
            raise PreflightError(f"{key}: {redact_text(str(err)) if isinstance(err, ValueError) else reason(err)}") from None
        check_media(key, records, f"{key}_images")


def check_media(key: str, records: list[Record], images_key: str, probes: int = 8) -> None:
    """Up to ``probes`` records spread over the split: if none of their files exists, no sample will load (a wrong
    image folder or file-name template)."""
    from data_pipeline.preflight import PreflightError, exists

    picked = records[:: max(1, len(records) // probes)][:probes]
    files = [f for r in picked for f in (r.image, r.audio) if f]
    if not files:
        return
    missing = [f for f in files if not exists(key, f)]
    if len(missing) == len(files):
        shown = ", ".join(repr(redact(f)) for f in missing[:3])
        raise PreflightError(f"{key}: none of the {len(files)} media files checked exists, e.g. {shown} (relative names "
                             f"resolve against {images_key}, else the file's folder)")
    if missing:
        log.warning("%s: %d of the %d media files checked do not exist, e.g. %r; those samples will be skipped", key,
                    len(missing), len(files), redact(missing[0]))


def read_records(path: str, fmt: str, images: str = "", annotations: str = "", image_template: str = "") -> list[Record]:
    """The samples of a standard file, in a fixed order (sorted by key). ``image_template``: data.image_template."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise ValueError(f"data {redact(path)!r} does not exist")
    base = images or posixpath.dirname(path)
    if fmt == "coco":
        records = _coco_records(json.loads(fs.cat_file(inner)), base)
    elif fmt == "vqa":
        if not annotations:
            raise ValueError(f"VQA questions {redact(path)!r} need their annotations JSON (data.train_annotations / "
                             "data.eval_annotations)")
        afs, ainner = filesystem(annotations)
        questions = json.loads(fs.cat_file(inner))
        records = _vqa_records(questions, json.loads(afs.cat_file(ainner)), base,
                               vqa_image_names(questions, image_template, path))
    elif fmt == "folder":
        records = _folder_records(path)
    elif fmt == "manifest":
        records = _manifest_records(path, images)
    else:
        raise ValueError(f"read_records does not read format {fmt!r}")
    if not records:
        raise ValueError(f"data {redact(path)!r} ({fmt}) holds no samples")
    return sorted(records, key=lambda r: r.key)


def _join(base: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else posixpath.join(base, name)


def _coco_records(coco: dict, base: str) -> list[Record]:
    captions: dict[Any, list[str]] = {}
    for ann in coco["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    records = []
    for image in coco["images"]:
        refs = captions.get(image["id"], [])
        records.append(Record(key=str(image["id"]), image=_join(base, image["file_name"]), text=refs[0] if refs else None,
                              meta={"image_id": image["id"], "captions": refs}))
    return records


def vqa_image_names(questions: dict, template: str, path: str):
    """image_id → file name: the ``images`` list's, else ``template`` (COCO's naming when the JSON has a
    ``data_subtype``). A JSON with neither, and no template, is an error: a guessed name finds no file."""
    files = {img["id"]: img["file_name"] for img in questions.get("images", [])}
    subtype = questions.get("data_subtype", "")
    if not template and not subtype:
        def name(image_id):
            if image_id not in files:
                raise ValueError(f"VQA questions {redact(path)!r} have no file name for image {image_id} (no images "
                                 "list entry, no data_subtype): set data.image_template, e.g. {image_id}.png")
            return files[image_id]
        return name
    template = template or COCO_IMAGE_TEMPLATE
    return lambda image_id: files.get(image_id) or template.format(image_id=image_id, subtype=subtype)


def _vqa_records(questions: dict, annotations: dict, base: str, image_name) -> list[Record]:
    answers = {a["question_id"]: a for a in annotations["annotations"]}
    records = []
    for q in questions["questions"]:
        ann = answers.get(q["question_id"])
        if ann is None:
            raise ValueError(f"question {q['question_id']} has no annotation in the annotations JSON")
        records.append(Record(key=str(q["question_id"]), image=_join(base, image_name(q["image_id"])), meta={
            "question_id": q["question_id"], "image_id": q["image_id"], "question": q["question"],
            "question_type": ann.get("question_type", ""), "answer_type": ann.get("answer_type", ""),
            "answers": [a["answer"] for a in ann["answers"]]}))
    return records


def _folder_records(path: str) -> list[Record]:
    fs, inner = filesystem(path)
    root = inner.rstrip("/")
    classes = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise ValueError(f"{redact(path)!r} has no class subfolders (expected ROOT/<class name>/<image>)")
    protocol = path.split("://", 1)[0] + "://" if "://" in path else ""
    records = []
    for label, name in enumerate(classes):
        for file in sorted(fs.find(f"{root}/{name}")):
            if file.lower().endswith(IMAGE_SUFFIXES):
                stem = file[len(root):].lstrip("/").rsplit(".", 1)[0]
                records.append(Record(key=stem, image=protocol + file, meta={"label": label, "label_name": name}))
    return records


def _manifest_records(path: str, images: str) -> list[Record]:
    from data_pipeline.config import InputConfig
    from data_pipeline.shard.readers import detect_format as manifest_format, load_rows

    fmt = manifest_format(path, "auto")
    rows = load_rows(path, fmt, InputConfig(path=path, pass_through=True), require_text=False)  # image + label is fine
    records = []
    for row in rows:
        meta = dict(row.extra)
        key = str(meta.pop("key", None) or meta.pop("id", None) or f"{row.index:09d}")
        image = _join(images, posixpath.relpath(row.image, posixpath.dirname(path))) if images and row.image else row.image
        records.append(Record(key=key, image=image, audio=row.audio, text=row.text, meta=meta))
    return records
