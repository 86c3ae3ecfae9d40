"""mmfuse curate's filters as pure functions: near duplicates against a brute-force search, first-copy-kept
semantics, and each caption rule."""

from collections import Counter

import numpy as np
import pytest

from data_pipeline.curate.config import CaptionRules, CurateConfig
from data_pipeline.curate.filters import (balance_concepts, caption_reasons, concept_matches, exact_duplicates,
                                          low_similarity, near_duplicates, semantic_duplicates)
from mmfuse.config import ConfigError, load_config


def brute_force(hashes, alive, max_distance):
    original = np.full(len(hashes), -1)
    kept = []
    for j in np.flatnonzero(alive):
        near = [i for i in kept if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= max_distance]
        if near:
            original[j] = near[0]
        else:
            kept.append(j)
    return original


def planted(rng, n, copies, max_flips):
    base = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    sources = rng.integers(0, n, copies)
    flipped = []
    for s in sources:
        h = int(base[s])
        for bit in rng.choice(64, rng.integers(0, max_flips + 1), replace=False):
            h ^= 1 << int(bit)
        flipped.append(h)
    hashes = np.concatenate([base, np.array(flipped, dtype=np.uint64)])
    order = rng.permutation(len(hashes))  # copies anywhere, before or after their source
    return hashes[order]


@pytest.mark.parametrize("max_distance", [0, 3, 4, 9])
def test_near_duplicates_equal_a_brute_force_search(max_distance):
    rng = np.random.default_rng(max_distance)
    hashes = planted(rng, 600, 150, max_flips=max_distance + 2)  # some copies beyond the distance, too
    alive = rng.random(len(hashes)) > 0.1
    found = near_duplicates(hashes, alive, max_distance)
    assert (found == brute_force(hashes, alive, max_distance)).all()
    assert (found >= 0).sum() > 20  # the planted copies within the distance were there to find
    assert (found[~alive] == -1).all()


def test_a_copy_of_a_dropped_sample_is_kept_and_the_first_copy_wins():
    # 0 and 2 are identical pictures; 0 was dropped by an earlier filter, so 2 is the first copy and 3 its copy.
    digests = ["a", "b", "a", "a", ""]
    alive = np.array([False, True, True, True, True])
    assert exact_duplicates(digests, alive).tolist() == [-1, -1, -1, 2, -1]
    hashes = np.array([5, 2**60, 5, 7, 5], dtype=np.uint64)  # 7 is one bit from 5
    assert near_duplicates(hashes, alive, 1).tolist() == [-1, -1, -1, 2, 2]


def test_similarity_drops_below_the_minimum_then_outside_the_top_fraction_of_the_rest():
    score = np.array([0.9, 0.1, 0.5, 0.5, 0.7, np.nan, 0.3, 0.8])
    alive = np.array([True, True, True, True, True, False, True, False])  # 5 and 7 were dropped before
    assert np.flatnonzero(low_similarity(score, alive, 0.2, 1.0)).tolist() == [1]
    # Of the 5 passing 0.2 (0.9, 0.5, 0.5, 0.7, 0.3), the best 3 stay; the tie at 0.5 keeps the earlier sample.
    assert np.flatnonzero(low_similarity(score, alive, 0.2, 0.6)).tolist() == [1, 3, 6]
    assert not low_similarity(score, alive, -1.0, 1.0).any()


def test_each_caption_rule_gives_its_reason():
    rules = CaptionRules(min_words=2, max_words=8, max_repeat=0.5, boilerplate=["Image not found"])
    captions = ["", "cat", "a red circle", "one two three four five six seven eight nine", "sale sale sale cheap",
                "IMAGE NOT FOUND on server", "sale sale cheap now"]
    assert caption_reasons(captions, rules) == ["caption_short", "caption_short", "", "caption_long",
                                                "caption_repetitive", "caption_boilerplate", ""]
    assert caption_reasons(captions, CaptionRules(min_words=0)) == [""] * len(captions)


def greedy(vectors, alive, preference, threshold):
    """SemDeDup in one cluster, one sample at a time: best first, dropped when that close to one kept before."""
    original = np.full(len(vectors), -1)
    kept = []
    for j in sorted(np.flatnonzero(alive), key=lambda i: (-np.nan_to_num(preference[i], nan=-np.inf), i)):
        similarity = [float(vectors[i] @ vectors[j]) for i in kept]
        if kept and max(similarity) >= threshold:
            original[j] = kept[int(np.argmax(similarity))]
        else:
            kept.append(j)
    return original


def copies(rng, n, planted, width, noise):
    vectors = rng.normal(size=(n, width)).astype(np.float32)
    source = rng.integers(0, n, planted)
    vectors = np.concatenate([vectors, vectors[source] + noise * rng.normal(size=(planted, width)).astype(np.float32)])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), source


@pytest.mark.parametrize("threshold", [0.9, 0.97])
def test_semantic_duplicates_in_one_cluster_equal_a_one_at_a_time_search(threshold):
    rng = np.random.default_rng(1)
    vectors, _ = copies(rng, 300, 100, 16, 0.15)
    alive = rng.random(len(vectors)) > 0.1
    preference = np.where(rng.random(len(vectors)) < 0.1, np.nan, rng.random(len(vectors)))
    found = semantic_duplicates(vectors, alive, preference, clusters=1, threshold=threshold, block=64)
    assert (found == greedy(vectors, alive, preference, threshold)).all()
    assert (found >= 0).sum() > 20 and (found[~alive] == -1).all()
    assert (found[found >= 0] >= 0).all() and (found[found[found >= 0]] == -1).all()  # copies of kept samples


def test_semantic_duplicates_find_planted_copies_keep_the_better_pair_and_repeat_for_a_seed():
    rng = np.random.default_rng(2)
    vectors, source = copies(rng, 2000, 200, 64, 0.05)  # a copy is ~0.96 cosine from its source, strangers ~0
    preference = rng.random(len(vectors))
    alive = np.ones(len(vectors), dtype=bool)
    found = semantic_duplicates(vectors, alive, preference, clusters=20, threshold=0.9, seed=3)
    assert (found[:2000] >= 0).sum() <= sum(preference[2000:] > preference[source])  # only sources that pair worse
    pairs = [{int(s), 2000 + k} for k, s in enumerate(source)]
    dropped = {int(i) for i in np.flatnonzero(found >= 0)}
    assert sum(bool(pair & dropped) for pair in pairs) >= 0.95 * len(pairs)  # k-means rarely splits a pair
    for i in dropped:  # the one kept of a pair is the one closer to its caption
        assert preference[found[i]] >= preference[i]
    assert (semantic_duplicates(vectors, alive, preference, 20, 0.9, seed=3) == found).all()


def test_concepts_match_whole_words_in_any_case_and_multi_word_concepts_whole():
    names, matched = concept_matches(
        ["A RED circle and a blue square.", "reddish circles", "a circle, red", "concatenate", ""],
        ["red circle", "circle", "Red", "cat", "  ", "red  circle"])
    assert names == ["red circle", "circle", "red", "cat"]  # blank and repeated concepts once
    assert matched == [[0, 1, 2], [], [1, 2], [], []]


def test_balancing_caps_every_concept_keeps_every_tail_sample_and_repeats_for_a_seed():
    rng = np.random.default_rng(4)
    weights = 1 / np.arange(1, 41) ** 1.2  # a long tail: concept 0 in ~20% of captions, concept 39 in a few
    matches = [sorted(set(rng.choice(40, rng.integers(1, 4), p=weights / weights.sum()).tolist())) for _ in range(3000)]
    matches += [[]] * 50
    alive = rng.random(len(matches)) > 0.05
    reasons = balance_concepts(matches, alive, cap=60, drop_unmatched=False, seed=0)
    kept = [i for i in range(len(matches)) if alive[i] and not reasons[i]]
    matched = Counter(c for i in np.flatnonzero(alive) for c in matches[i])
    counts = Counter(c for i in kept for c in matches[i])
    assert max(counts.values()) <= 60 and max(matched.values()) > 300
    tail = {c for c, n in matched.items() if n <= 60}
    assert tail and all(not reasons[i] for i in np.flatnonzero(alive) if matches[i] and set(matches[i]) <= tail)
    assert all(counts[c] == 60 for c, _ in matched.most_common(3))  # the largest fill their cap
    assert all(reasons[i] == "" for i in np.flatnonzero(~alive))  # dropped before: not judged again
    assert {reasons[i] for i in np.flatnonzero(alive)} == {"", "concept_over_cap"}
    assert balance_concepts(matches, alive, 60, False, seed=0) == reasons
    assert balance_concepts(matches, alive, 60, False, seed=1) != reasons
    dropping = balance_concepts(matches, alive, 60, True, seed=0)
    assert [i for i, why in enumerate(dropping) if why == "no_concept"] == [i for i in range(3000, 3050) if alive[i]]


@pytest.mark.parametrize("override, message", [
    ("semantic_dedup.clusters=8", "semantic_dedup compares a model's embeddings: set scorer=RELEASE"),
    ("balance.max_per_concept=5", "balance.max_per_concept needs a concept list"),
    ("balance.unmatched=maybe", "balance.unmatched keep or drop"),
    ("captions.max_words=2", "captions.max_words=2 is below captions.min_words=3"),
    ("dedup.max_distance=40", "dedup.max_distance must be within 0..32"),
    ("captions.max_repeat=1.5", "captions.max_repeat in [0, 1]"),
])
def test_rules_that_cannot_work_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(CurateConfig, [], ["input.path=x", "output.path=y", "captions.min_words=3", override])


def test_the_shipped_recipe_loads_and_applies_its_rules():
    cfg = load_config(CurateConfig, ["configs/curate/default.yaml"], ["input.path=x", "output.path=y"])
    assert (cfg.captions.min_words, cfg.dedup.near, cfg.dedup.max_distance) == (2, True, 4)
    reasons = caption_reasons(["a red circle", "circle", "Image not found - a red circle"], cfg.captions)
    assert reasons == ["", "caption_short", "caption_boilerplate"]


def test_the_perceptual_hash_is_imagehash_phash_bit_for_bit():
    import io

    import imagehash
    from PIL import Image

    from data_pipeline.curate.scan import perceptual_hash
    from data_pipeline.synth import make_scene, render_image

    rng = np.random.default_rng(0)
    images = [render_image(make_scene(0, i), 128) for i in range(40)]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(37, 91), (300, 200), (8, 8)]]
    for i, image in enumerate(images):
        out = io.BytesIO()
        image.save(out, "JPEG" if i % 2 else "PNG")
        data = out.getvalue()
        reference = Image.open(io.BytesIO(data))
        reference.draft("L", (64, 64))
        expected = int.from_bytes(np.packbits(imagehash.phash(reference).hash.flatten()).tobytes(), "big")
        assert perceptual_hash(data, 1 << 30) == (expected, image.size), i
    assert image.size == (8, 8) and perceptual_hash(data, 64)[1] == (8, 8)
    with pytest.raises(ValueError, match="8x8 pixels"):  # the header's claim, checked before decoding
        perceptual_hash(data, 63)
    with pytest.raises(ValueError, match="UnidentifiedImageError"):
        perceptual_hash(b"not an image", 1 << 30)


def test_without_hashes_the_scan_still_finds_what_does_not_decode():
    """dedup.near=false: the scan skips the perceptual hash but decodes each image (at an eighth of its size), so
    an image the hash would have failed on fails the same way, and a good one gives its stored size."""
    import io

    from PIL import Image

    from data_pipeline.curate.scan import perceptual_hash, readable
    from data_pipeline.synth import make_scene, render_image

    out = io.BytesIO()
    render_image(make_scene(0, 0), 128).save(out, "JPEG")
    data = out.getvalue()
    assert readable(data, 1 << 30) == (128, 128) == perceptual_hash(data, 1 << 30)[1]
    for broken in (data[: len(data) // 2], b"not an image"):  # truncated: the header is whole, the pixels are not
        with pytest.raises(ValueError):
            perceptual_hash(broken, 1 << 30)
        with pytest.raises(ValueError):
            readable(broken, 1 << 30)
    with pytest.raises(ValueError, match="128x128 pixels"):
        readable(data, 128 * 128 - 1)
    png = io.BytesIO()
    Image.new("RGB", (20, 10)).save(png, "PNG")
    assert readable(png.getvalue(), 1 << 30) == (20, 10)
