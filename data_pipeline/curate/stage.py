"""``mmfuse curate``: which samples of a sharded dataset to train on, as a subset index over the original shards.

    mmfuse curate input.path=SHARDS output.path=OUT [captions.min_words=3] [dedup.max_distance=4] ...
    mmfuse pretrain ... data.train=SHARDS data.keep=OUT

Scans every shard once (in parallel; a rerun scans only the shards it has not), then applies the filters to the
scans, which takes seconds: change a rule and rerun to re-decide without reading a shard again. Writes
``OUT/index.parquet`` (shard, position, key, kept, reason, duplicate_of, ...), ``OUT/curate.json`` and
``OUT/REPORT.md``. A run that keeps no sample is an error (the index is still written, to see why).
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
from collections import Counter

import numpy as np
import pyarrow as pa

from data_pipeline.curate.config import CurateConfig
from data_pipeline.curate.filters import (WORD, balance_concepts, caption_reasons, concept_matches, exact_duplicates,
                                          low_similarity, near_duplicates, semantic_duplicates)
from data_pipeline.curate.scan import ScanTask, ScanWorker, read_table, scan_path, scanned, write_table
from mmfuse.config import parse_args, to_dict
from mmfuse.redact import redact, redact_values
from mmfuse.storage import filesystem, write_bytes

log = logging.getLogger(__name__)
SCAN_SETTINGS = "scan/settings.json"
SCORER_MODALITIES = "pretrain.scorer:scorer_modalities"


def run(cfg: CurateConfig) -> dict:
    """Scan, filter, write the index and the report; returns the summary (curate.json)."""
    preflight(cfg)
    tasks, todo = plan_scans(cfg)
    scan(cfg, todo)
    return conclude(cfg, tasks)


def plan_scans(cfg: CurateConfig, bind: bool = True) -> tuple[list[ScanTask], list[ScanTask]]:
    """(a scan per shard of ``input.path``, those not written yet); with ``bind`` (not in a dry run), checks and
    binds the scan settings (``SCAN_SETTINGS``)."""
    from data_pipeline.loader.sources import resolve_sources

    (source,) = resolve_sources(cfg.input.path)
    fs, root = filesystem(cfg.output.path)
    if bind:
        check_scan_settings(cfg, fs, root)
    tasks = [ScanTask(shard, scan_path(cfg.output.path, shard.url), phash=cfg.dedup.near) for shard in source.shards]
    return tasks, [task for task in tasks if not scanned(task)]


def scan(cfg: CurateConfig, todo: list[ScanTask]) -> None:
    """Write the scans of ``todo`` over ``cfg.processes`` processes (each shard's parquet once it is whole)."""
    from data_pipeline.shard.distributor import run_local
    from mmfuse.progress import progress

    bar = progress(sum(task.shard.count for task in todo), "curate: scan", "sample", disable=not cfg.progress, delay=1)
    for _ in run_local(ScanWorker(cfg), todo, cfg.processes, (lambda done, ok: bar.update(done - bar.n)) if cfg.progress else None):
        pass
    bar.close()


def conclude(cfg: CurateConfig, tasks: list[ScanTask]) -> dict:
    """From the scans of every shard (``tasks``, all written): the index, curate.json, the report, its pictures and
    the kept samples as shards (``output.shards``); the summary. Decided from the scans alone, so a rerun, or a
    second array task concluding at the same time, writes the same files."""
    fs, root = filesystem(cfg.output.path)
    shards = [task.shard for task in tasks]
    scans = pa.concat_tables([read_table(task.out) for task in tasks])
    index = decide(scans, cfg)
    summary = summarize(index, cfg)
    write_table(posixpath.join(cfg.output.path, "index.parquet"), index)
    _write(fs, posixpath.join(root, "curate.json"), (json.dumps(summary, indent=1) + "\n").encode())
    _write(fs, posixpath.join(root, "REPORT.md"), report(index, summary).encode())
    if "image_text_similarity" in index.column_names:
        from mmfuse.plots import score_histogram

        score = similarity(index)
        judged = np.isfinite(score)
        _write(fs, posixpath.join(root, "similarity.png"), score_histogram(
            score[judged].tolist(), np.asarray(index["kept"].to_pylist())[judged].tolist(), "scorer similarity"))
    if cfg.sheet_samples:
        from data_pipeline.curate.sheets import sheets

        for outcome, png in sheets(index, scans["caption"].to_pylist(), shards, cfg, cfg.sheet_samples).items():
            _write(fs, posixpath.join(root, "sheets", f"{outcome}.png"), png)
    print(one_line(summary), file=sys.stderr)
    if not summary["kept"]:
        raise ValueError(f"every one of the {summary['samples']} samples was dropped ({_reasons(summary)}): loosen the "
                         f"rules; the decisions are in {redact(cfg.output.path)}/index.parquet")
    if cfg.output.shards:
        from data_pipeline.curate.materialize import write_kept

        written = write_kept(index, shards, cfg.output.shards, cfg.output.path, cfg.processes)
        print(f"curate: wrote the {written['written']} kept samples as {written['shards']} shards to "
              f"{redact(cfg.output.shards)}", file=sys.stderr)
    return summary


def preflight(cfg: CurateConfig) -> None:
    """Before any shard is read: the dataset lists shards, the output is writable, and each rule's input exists."""
    from data_pipeline.preflight import PreflightError, check_dataset, check_output, dataset_modalities
    from data_pipeline.loader.sources import dataset_names

    if len(dataset_names(cfg.input.path)) > 1:
        raise PreflightError("input.path names several datasets ('::'): curate one at a time (data.keep applies to one)")
    check_dataset("input.path", cfg.input.path)
    check_output("output.path", cfg.output.path)
    if cfg.output.shards:
        if cfg.output.shards.rstrip("/") in (cfg.input.path.rstrip("/"), cfg.output.path.rstrip("/")):
            raise PreflightError("output.shards must be a folder of its own, not input.path or output.path")
        check_output("output.shards", cfg.output.shards)
    found = dataset_modalities(cfg.input.path, cfg.members)
    if "text" not in found and (cfg.captions.min_words or cfg.captions.max_words or cfg.captions.boilerplate):
        raise PreflightError(f"input.path has {', '.join(sorted(found)) or 'no known modality'} and no captions: the "
                             "caption rules would drop every sample (set captions.min_words=0, or check members.text)")
    if cfg.scorer:
        check_scorer_fits(cfg, found)
    if cfg.balance.max_per_concept:
        if "text" not in found:
            raise PreflightError("balance matches captions against concepts, and input.path has no captions (check "
                                 "members.text)")
        try:
            listed = concepts(cfg)
        except (FileNotFoundError, UnicodeDecodeError) as err:
            raise PreflightError(f"balance.concepts_file={redact(cfg.balance.concepts_file)}: {type(err).__name__}: "
                                 "expected a UTF-8 text file of one concept per line") from None
        if not any(WORD.findall(concept) for concept in listed):
            raise PreflightError("balance.concepts / balance.concepts_file hold no concept (no word to match)")
    if "image" not in found and (cfg.dedup.exact or cfg.dedup.near):
        log.info("input.path has no images: the image de-duplication has nothing to compare")


def check_scorer_fits(cfg: CurateConfig, found: set[str]) -> None:
    """``scorer`` is a model that can score these shards, checked without loading it (``SCORER_MODALITIES``, named:
    this layer sits below it): a release or an open_clip file with its architecture, embedding a caption and the
    image or audio beside it, and the modality semantic_dedup compares."""
    import importlib

    from data_pipeline.preflight import PreflightError, check_credentials

    check_credentials("scorer", cfg.scorer)
    module, _, name = SCORER_MODALITIES.partition(":")
    try:
        embeds = set(getattr(importlib.import_module(module), name)(cfg.scorer, cfg.open_clip_model))
    except ValueError as err:
        raise PreflightError(str(err)) from None
    both = embeds & found
    what = f"scorer={redact(cfg.scorer)} embeds {', '.join(sorted(embeds))}, and input.path has {', '.join(sorted(found)) or 'no known modality'}"
    if "text" not in both or not both & {"image", "audio"}:
        raise PreflightError(f"{what}: no image-caption or audio-caption pair to score (check members, or the scorer)")
    if cfg.semantic_dedup.clusters and cfg.semantic_dedup.modality not in both:
        raise PreflightError(f"{what}: semantic_dedup.modality={cfg.semantic_dedup.modality} has no embeddings to "
                             "compare (set semantic_dedup.modality to one that both have)")


def check_scan_settings(cfg: CurateConfig, fs, root: str) -> None:
    """Scans are reused by a rerun only when they were made reading the same members the same way (settings that
    made no scan yet bind nothing: a run stopped before its first shard leaves the folder open to other ones)."""
    scorer = {"scorer": redact(cfg.scorer), **({"open_clip_model": redact(cfg.open_clip_model)} if cfg.open_clip_model else {})}
    settings = json.dumps({"members": to_dict(cfg.members), "max_image_pixels": cfg.max_image_pixels, **scorer},
                          sort_keys=True)
    path = posixpath.join(root, SCAN_SETTINGS)
    if fs.exists(path) and fs.glob(posixpath.join(root, "scan", "*.parquet")):
        if fs.cat_file(path).decode() != settings:
            raise ValueError(f"{redact(cfg.output.path)} holds scans made with another scorer or other members / "
                             "max_image_pixels settings: use a new output.path, or rerun with the settings that made them")
        return
    _write(fs, path, settings.encode())


def decide(scans: pa.Table, cfg: CurateConfig) -> pa.Table:
    """The index: the scans' identity columns plus kept, reason and duplicate_of, one row per sample."""
    keys = scans["key"].to_pylist()
    reasons = [problem if problem == "image_unreadable" else "" for problem in scans["problem"].to_pylist()]
    for i, why in enumerate(caption_reasons(scans["caption"].to_pylist(), cfg.captions)):
        reasons[i] = reasons[i] or why
    score = similarity(scans)
    if score is not None:
        alive = np.array([not why for why in reasons]) & np.isfinite(score)
        for i in np.flatnonzero(low_similarity(score, alive, cfg.similarity.min, cfg.similarity.top_fraction)):
            reasons[i] = "low_similarity"
    duplicate_of = [""] * len(keys)
    digests = scans["digest"].to_pylist()
    steps = [("duplicate", cfg.dedup.exact, lambda alive: exact_duplicates(digests, alive)),
             ("near_duplicate", cfg.dedup.near,
              lambda alive: near_duplicates(scans["phash"].to_numpy(), alive, cfg.dedup.max_distance))]
    for reason, enabled, find in steps:
        if not enabled:
            continue
        alive = np.array([not why and bool(digest) for why, digest in zip(reasons, digests)], dtype=bool)
        for i, original in enumerate(find(alive)):
            if original >= 0:
                reasons[i], duplicate_of[i] = reason, keys[original]
    if cfg.semantic_dedup.clusters:
        rules = cfg.semantic_dedup
        vectors = embeddings(scans, rules.modality)
        alive = np.array([not why for why in reasons]) & np.isfinite(vectors).all(axis=1) & vectors.any(axis=1)
        pair = scans[f"{rules.modality}_text_similarity"].to_numpy(zero_copy_only=False)
        found = semantic_duplicates(vectors, alive, pair, rules.clusters, rules.threshold, rules.iterations, rules.seed)
        for i in np.flatnonzero(found >= 0):
            reasons[i], duplicate_of[i] = "semantic_duplicate", keys[found[i]]
    matched = None
    if cfg.balance.max_per_concept:
        names, matched = concept_matches(scans["caption"].to_pylist(), concepts(cfg))
        alive = np.array([not why for why in reasons])
        for i, why in enumerate(balance_concepts(matched, alive, cfg.balance.max_per_concept,
                                                 cfg.balance.unmatched == "drop", cfg.balance.seed)):
            reasons[i] = reasons[i] or why
        matched = [[names[concept] for concept in row] for row in matched]
    words = [len(WORD.findall(text)) for text in scans["caption"].to_pylist()]
    scored = {name: scans[name] for name in ("image_text_similarity", "audio_text_similarity") if name in scans.column_names}
    return pa.table({
        "shard": scans["shard"], "position": scans["position"], "key": scans["key"],
        "kept": pa.array([not why for why in reasons]), "reason": pa.array(reasons),
        "duplicate_of": pa.array(duplicate_of), "caption_words": pa.array(words, pa.int32()),
        "width": scans["width"], "height": scans["height"],
        # Scans made without near-duplicate removal hold no perceptual hashes (scan.HASHED).
        "phash": pa.array([f"{h:016x}" for h in scans["phash"].to_pylist()] if cfg.dedup.near else [""] * len(scans)),
        "digest": scans["digest"], **scored,
        **({"concepts": pa.array(matched, pa.list_(pa.string()))} if matched is not None else {}),
    })


def embeddings(scans: pa.Table, modality: str) -> np.ndarray:
    """The scans' ``modality`` embeddings as a float32 matrix (zeros where a sample has none; a scorer's scans hold
    all three)."""
    array = scans[f"{modality}_embedding"].combine_chunks()
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def concepts(cfg: CurateConfig) -> list[str]:
    """balance.concepts plus the lines of balance.concepts_file (blank lines and # comments skipped)."""
    listed = list(cfg.balance.concepts)
    if cfg.balance.concepts_file:
        fs, path = filesystem(cfg.balance.concepts_file)
        lines = fs.cat_file(path).decode("utf-8").splitlines()
        listed += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return listed


def similarity(scans: pa.Table) -> np.ndarray | None:
    """Per sample the scorer's image-text similarity, else its audio-text one (audio-only samples), NaN without
    either; None when the scans hold no scores."""
    if "image_text_similarity" not in scans.column_names:
        return None
    image_text = scans["image_text_similarity"].to_numpy(zero_copy_only=False)
    return np.where(np.isfinite(image_text), image_text, scans["audio_text_similarity"].to_numpy(zero_copy_only=False))


def summarize(index: pa.Table, cfg: CurateConfig) -> dict:
    reasons = Counter(why for why in index["reason"].to_pylist() if why)
    kept = sum(index["kept"].to_pylist())
    summary = {"input": redact(cfg.input.path), "samples": index.num_rows, "kept": kept,
               "shards": len(set(index["shard"].to_pylist())), "dropped": dict(reasons.most_common()),
               "settings": redact_values({k: v for k, v in to_dict(cfg).items() if k not in ("input", "output")})}
    if "concepts" in index.column_names:
        summary["concepts"] = concept_counts(index)
    return summary


def concept_counts(index: pa.Table) -> dict[str, dict[str, int]]:
    """Per concept, the samples whose caption matched it and the kept ones, most matched first."""
    matched, kept = Counter(), Counter()
    for names, keep in zip(index["concepts"].to_pylist(), index["kept"].to_pylist()):
        matched.update(names)
        kept.update(names if keep else [])
    return {name: {"matched": count, "kept": kept[name]} for name, count in matched.most_common()}


def one_line(summary: dict) -> str:
    share = summary["kept"] / max(summary["samples"], 1)
    return (f"curate: kept {summary['kept']} of {summary['samples']} samples ({share:.1%})"
            + (f"; dropped {_reasons(summary)}" if summary["dropped"] else ""))


def report(index: pa.Table, summary: dict, examples: int = 5) -> str:
    rows = index.select(["key", "reason", "duplicate_of"]).to_pylist()
    lines = [f"# Curation of {summary['input']}", "",
             f"{summary['samples']} samples in {summary['shards']} shards: **{summary['kept']} kept** "
             f"({summary['kept'] / max(summary['samples'], 1):.1%}).", "",
             "| reason | samples | share | examples |", "|---|---|---|---|"]
    for reason, count in summary["dropped"].items():
        seen = [r for r in rows if r["reason"] == reason][:examples]
        shown = ", ".join(f"{r['key']} (of {r['duplicate_of']})" if r["duplicate_of"] else r["key"] for r in seen)
        lines.append(f"| {reason} | {count} | {count / summary['samples']:.1%} | {shown} |")
    if "image_text_similarity" in index.column_names:
        lines += ["", "![similarity of kept and dropped samples](similarity.png)"]
    if "concepts" in summary:
        lines += ["", f"Concepts matched: {len(summary['concepts'])} (the {examples * 2} most frequent):", "",
                  "| concept | matched | kept |", "|---|---|---|"]
        lines += [f"| {name} | {counts['matched']} | {counts['kept']} |"
                  for name, counts in list(summary["concepts"].items())[:examples * 2]]
    if summary["settings"].get("sheet_samples"):
        outcomes = ["kept", *summary["dropped"]] if summary["kept"] else list(summary["dropped"])
        lines += ["", "Samples of each outcome (sheets/):", ""]
        lines += [f"- {outcome}: ![{outcome}](sheets/{outcome}.png)" for outcome in outcomes]
    lines += ["", "Train on the kept samples, read from the original shards:", "",
              f"    mmfuse pretrain ... data.train={summary['input']} data.keep=<this folder>", "",
              "Settings: `" + json.dumps(summary["settings"], sort_keys=True) + "`", ""]
    return "\n".join(lines)


def _reasons(summary: dict) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in summary["dropped"].items()) or "no reason"


def _write(fs, path: str, data: bytes) -> None:
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    write_bytes(fs, path, data)


def main(argv: list[str] | None = None) -> int:
    from mmfuse.logs import setup_logging

    cfg = parse_args(CurateConfig, argv, prog="mmfuse curate", description=__doc__.strip())
    setup_logging()
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
