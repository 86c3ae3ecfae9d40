from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.loader.plan import check_feasible, slot_plan, windows
from data_pipeline.loader.sources import ShardInfo, Source


def sources_of(counts, weight=1.0, name="d"):
    return [Source(name, tuple(ShardInfo(f"{name}-{i}.tar", c) for i, c in enumerate(counts)), weight)]


def planned(plan):
    return [(segment.url, i) for window in windows(plan) for segment, i in window]


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=12), slots=st.integers(1, 8), batch=st.integers(1, 9),
       window=st.integers(1, 17), epoch=st.integers(0, 3))
def test_exact_plan_covers_every_sample_once_with_equal_batch_counts(counts, slots, batch, window, epoch):
    sources = sources_of(counts)
    try:
        check_feasible(sources, "exact", slots, batch)
    except ValueError:
        # Only tiny per-slot counts (or batch size 1 with an uneven split) cannot give equal batch counts.
        assert sum(counts) // slots < 3 or batch == 1
        return
    plans = [slot_plan(sources, "exact", 7, epoch, k, slots, batch, window) for k in range(slots)]
    seen = Counter(item for p in plans for item in planned(p))
    assert sum(seen.values()) == sum(counts) and set(seen.values()) == {1}
    assert len({len(p.batch_sizes) for p in plans}) == 1  # every slot (so every rank) has the same batch count
    for p in plans:
        assert sum(p.batch_sizes) == p.samples and min(p.batch_sizes) >= 1 and max(p.batch_sizes) <= batch


def test_exact_order_depends_on_seed_and_epoch_only():
    sources = sources_of([10] * 6)
    first = planned(slot_plan(sources, "exact", 1, 0, 0, 2, 4, 8))
    assert first == planned(slot_plan(sources, "exact", 1, 0, 0, 2, 4, 8))
    assert first != planned(slot_plan(sources, "exact", 1, 1, 0, 2, 4, 8))
    assert first != planned(slot_plan(sources, "exact", 2, 0, 0, 2, 4, 8))


def test_resampled_plan_fills_every_batch():
    sources = sources_of([5, 7]) + sources_of([3], name="e")
    plan = slot_plan(sources, "resampled", 0, 0, 1, 4, 8, 10, samples_per_epoch=100)
    assert plan.batch_sizes == (8,) * 4 and plan.samples == 32


@pytest.mark.parametrize("counts, slots, batch, message", [
    ([3], 4, 2, "at least one sample per loader slot"),
    ([], 1, 1, "no samples"),
])
def test_infeasible_plans_fail_with_advice(counts, slots, batch, message):
    with pytest.raises(ValueError, match=message):
        check_feasible(sources_of(counts) if counts else [Source("d", (), 1.0)], "exact", slots, batch)
