"""The filters: pure functions over the scanned columns, each returning per sample the reason it drops it ("" keeps).

They run in order over the samples still kept (captions, then exact duplicates, then near duplicates), so each dropped
sample has exactly one reason, and a duplicate is always a copy of a sample that is itself kept. Sample order is the
dataset's (shard, position): the first copy of a picture is the one kept, the same one on every run.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from data_pipeline.curate.config import CaptionRules

WORD = re.compile(r"\w+", re.UNICODE)


def caption_reasons(captions: list[str], rules: CaptionRules) -> list[str]:
    phrases = [p.lower() for p in rules.boilerplate if p.strip()]
    reasons = []
    for text in captions:
        words = WORD.findall(text.lower())
        if len(words) < rules.min_words:
            reasons.append("caption_short")
        elif rules.max_words and len(words) > rules.max_words:
            reasons.append("caption_long")
        elif rules.max_repeat and len(words) >= 4 and Counter(words).most_common(1)[0][1] / len(words) > rules.max_repeat:
            reasons.append("caption_repetitive")
        elif any(phrase in text.lower() for phrase in phrases):
            reasons.append("caption_boilerplate")
        else:
            reasons.append("")
    return reasons


def low_similarity(score: np.ndarray, alive: np.ndarray, minimum: float, top_fraction: float) -> np.ndarray:
    """True where an ``alive`` sample's score is below ``minimum``, or outside the best ``top_fraction`` of the
    alive samples that pass it (ties broken by sample order: the earlier sample ranks higher)."""
    drop = alive & (score < minimum)
    passing = np.flatnonzero(alive & ~drop)
    if top_fraction < 1 and len(passing):
        keep = int(np.ceil(top_fraction * len(passing)))
        ranked = passing[np.argsort(-score[passing], kind="stable")]
        drop[ranked[keep:]] = True
    return drop


def exact_duplicates(digests: list[str], alive: np.ndarray) -> np.ndarray:
    """For each sample, the index of the earlier kept sample with the same digest, else -1 (only ``alive``
    samples with a digest take part)."""
    first: dict[str, int] = {}
    original = np.full(len(digests), -1, dtype=np.int64)
    for i, digest in enumerate(digests):
        if not alive[i] or not digest:
            continue
        if digest in first:
            original[i] = first[digest]
        else:
            first[digest] = i
    return original


def near_duplicates(hashes: np.ndarray, alive: np.ndarray, max_distance: int) -> np.ndarray:
    """For each sample, the index of the earliest kept sample whose 64-bit hash is within ``max_distance`` bits,
    else -1. Greedy in sample order: a sample is kept unless it is near a sample kept before it.

    Candidate pairs come from the pigeonhole principle: split the 64 bits into ``max_distance + 1`` bands; two
    hashes within ``max_distance`` bits agree exactly on at least one band, so only samples sharing a band value
    are compared (multi-index hashing; Norouzi et al. 2012)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    original = np.full(len(hashes), -1, dtype=np.int64)
    members = np.flatnonzero(alive)
    if len(members) < 2:
        return original
    near: dict[int, set[int]] = {}  # later sample -> earlier samples within the distance
    for lo, hi in _bands(max_distance):
        values = (hashes[members] >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(values, kind="stable")
        starts = np.flatnonzero(np.r_[True, values[order][1:] != values[order][:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
            if stop - start > 1:
                _close_pairs(members[np.sort(order[start:stop])], hashes, max_distance, near)
    for later in sorted(near):
        kept_before = [i for i in sorted(near[later]) if original[i] < 0]
        if kept_before:
            original[later] = kept_before[0]
    return original


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """``max_distance + 1`` bit ranges [lo, hi) covering the 64 bits, as equal as they can be."""
    n = max_distance + 1
    edges = [round(64 * k / n) for k in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _close_pairs(group: np.ndarray, hashes: np.ndarray, max_distance: int, near: dict[int, set[int]],
                 block: int = 1024) -> None:
    """Record every pair of ``group`` (ascending sample indices) within ``max_distance`` bits, in blocks of rows so a
    large group (thousands of blank images) never builds its whole distance matrix."""
    values = hashes[group]
    for start in range(0, len(group), block):
        rows = values[start:start + block]
        distance = np.bitwise_count(rows[:, None] ^ values[None, :])
        later_only = np.arange(len(group))[None, :] > np.arange(start, start + len(rows))[:, None]
        for i, j in zip(*np.nonzero((distance <= max_distance) & later_only)):
            near.setdefault(int(group[j]), set()).add(int(group[start + i]))
