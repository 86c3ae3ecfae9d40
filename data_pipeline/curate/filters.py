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


def semantic_duplicates(embeddings: np.ndarray, alive: np.ndarray, preference: np.ndarray, clusters: int,
                        threshold: float, iterations: int = 20, seed: int = 0, block: int = 1024) -> np.ndarray:
    """SemDeDup: for each sample, the index of the kept sample of its k-means cluster that it is within
    ``threshold`` cosine of (the most similar one), else -1. Within a cluster, samples are visited best first (highest
    ``preference``, NaN last, then sample order), and a sample is kept unless it is that close to one kept before it;
    only ``alive`` samples take part."""
    original = np.full(len(embeddings), -1, dtype=np.int64)
    members = np.flatnonzero(alive)
    if len(members) < 2:
        return original
    vectors = np.asarray(embeddings[members], dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    labels = kmeans(vectors, min(clusters, len(members)), iterations, seed)
    rank = np.nan_to_num(np.asarray(preference, dtype=np.float64)[members], nan=-np.inf)
    order = np.lexsort((members, -rank, labels))  # by cluster, then best first, then sample order
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
        group = order[start:stop]
        found = _greedy(vectors[group], threshold, block)
        copies = np.flatnonzero(found >= 0)
        original[members[group[copies]]] = members[group[found[copies]]]
    return original


def kmeans(vectors: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means (faiss) cluster labels of unit ``vectors``; deterministic for a seed."""
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads, at INFO
    import faiss

    model = faiss.Kmeans(vectors.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                         min_points_per_centroid=1)
    model.train(vectors)
    return model.index.search(vectors, 1)[1][:, 0]


def _greedy(vectors: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """Rows visited in order: for each, the most similar earlier kept row at or above ``threshold`` cosine (then it is
    not kept), else -1. Similarities are computed ``block`` rows at a time, so a large cluster never builds its whole
    matrix and no pair list grows with the square of its size."""
    original = np.full(len(vectors), -1, dtype=np.int64)
    kept = np.zeros(len(vectors), dtype=bool)
    for start in range(0, len(vectors), block):
        similarity = vectors[start:start + block] @ vectors[:start + block].T
        close = np.tril(similarity >= threshold, k=start - 1).any(axis=1)  # rows with any earlier row that close
        for row in range(len(similarity)):
            i = start + row
            if close[row]:
                candidates = np.where(kept[:i], similarity[row, :i], -np.inf)
                best = int(np.argmax(candidates))
                if candidates[best] >= threshold:
                    original[i] = best
                    continue
            kept[i] = True
    return original


def concept_matches(captions: list[str], concepts: list[str]) -> tuple[list[str], list[list[int]]]:
    """(the concepts as matched: lower-case words joined by spaces, one per distinct concept; per caption the indices
    of the concepts it holds as whole words). Every word n-gram of a caption up to the longest concept is looked up
    once, so a list of 500,000 concepts costs what a list of ten does."""
    names: dict[str, int] = {}
    for concept in concepts:
        name = " ".join(WORD.findall(concept.lower()))
        if name:
            names.setdefault(name, len(names))
    longest = max((name.count(" ") + 1 for name in names), default=0)
    matches = []
    for text in captions:
        words = WORD.findall(text.lower())
        found = {names[gram] for n in range(1, longest + 1) for i in range(len(words) - n + 1)
                 if (gram := " ".join(words[i:i + n])) in names}
        matches.append(sorted(found))
    return list(names), matches


def balance_concepts(matches: list[list[int]], alive: np.ndarray, cap: int, drop_unmatched: bool,
                     seed: int) -> list[str]:
    """MetaCLIP's balancing with an exact cap: per sample "" (kept), ``concept_over_cap`` or ``no_concept``.

    A head concept is one matched by more than ``cap`` alive samples. A sample matching only tail concepts is kept.
    The others are kept while every head concept they match has fewer than ``cap`` kept samples, visited in a seeded
    random order: first those that also match a tail concept (so the tail loses as little as it can), then the rest.
    So no concept ends with more than ``cap`` kept samples."""
    alive_rows = np.flatnonzero(alive)
    counts = Counter(concept for i in alive_rows for concept in matches[i])
    used: Counter = Counter()
    reasons = [""] * len(matches)
    mixed, head_only = [], []
    for i in alive_rows:
        heads = [concept for concept in matches[i] if counts[concept] > cap]
        if not matches[i]:
            reasons[i] = "no_concept" if drop_unmatched else ""
        elif heads:
            (mixed if len(heads) < len(matches[i]) else head_only).append(i)
    rng = np.random.default_rng(seed)
    for i in [*rng.permutation(np.array(mixed, dtype=np.int64)), *rng.permutation(np.array(head_only, dtype=np.int64))]:
        heads = [concept for concept in matches[i] if counts[concept] > cap]
        if all(used[concept] < cap for concept in heads):
            used.update(heads)
        else:
            reasons[i] = "concept_over_cap"
    return reasons
