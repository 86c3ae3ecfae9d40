"""mmfuse curate's filters as pure functions: near duplicates against a brute-force search, first-copy-kept
semantics, and each caption rule."""

import numpy as np
import pytest

from data_pipeline.curate.config import CaptionRules, CurateConfig
from data_pipeline.curate.filters import caption_reasons, exact_duplicates, low_similarity, near_duplicates
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


@pytest.mark.parametrize("override, message", [
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
