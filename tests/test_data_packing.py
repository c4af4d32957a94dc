"""Packing and batching: BFD, per-example shifted targets, step composition, layouts (attention
equivalence of the layouts is in test_attention.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sftune.data.packing import IGNORE, BatchPlan, best_fit_decreasing, collate


def naive_bfd(lengths, capacity):
    bins, space = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: (space[b], b))
            bins[b].append(i)
            space[b] -= lengths[i]
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    return bins


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=200), st.integers(64, 200))
def test_bfd_places_everything_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # same number of bins as the textbook algorithm
    assert len(bins) == len(naive_bfd(lengths, capacity))


def test_bfd_is_whole_dataset_not_chunked():
    lengths = [60, 40] * 1000 + [30] * 10
    bins = best_fit_decreasing(lengths, 100)
    assert len(bins) == 1000 + 4  # every 60 pairs with a 40 across the whole dataset; 10 x 30 need 4 more


def test_bfd_rejects_oversized_items():
    with pytest.raises(ValueError):
        best_fit_decreasing([5, 11], 10)


def test_collate_shifts_targets_within_each_example():
    a = ([1, 2, 3], [-100, 2, 3])
    b = ([4, 5], [4, 5])
    batch = collate([[a, b], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    # position t predicts label t+1 of the same example; an example's last token predicts nothing
    assert batch.targets.tolist() == [[2, 3, IGNORE, 5, IGNORE], [5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert batch.n_loss == 4 and batch.real_tokens == 7
    assert batch.loss_targets.tolist() == [2, 3, 5, 5]
    assert batch.loss_index.tolist() == [0, 1, 3, 5]


def test_collate_counts_loss_tokens():
    batch = collate([[([1, 2, 3], [-100, -100, 3])]], pad_id=0)
    assert batch.n_loss == 1


@pytest.mark.parametrize("packing", [False, True])
def test_step_composition_independent_of_micro_batch_split(packing):
    """8x1, 2x4, 1x8 and 2 ranks x 2 x 2 see the same units in every optimizer step."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=103)
    setups = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]
    plans = {s: BatchPlan.build(lengths, batch_size=s[0], grad_accum=s[1], world_size=s[2], packing=packing,
                                max_length=64, seed=3) for s in setups}
    for epoch in range(2):
        reference = plans[setups[0]].epoch_steps(epoch)
        for (b, g, w), plan in plans.items():
            assert plan.epoch_steps(epoch) == reference
            for step in reference:
                per_rank = [plan.micro_batches(step, rank, w) for rank in range(w)]
                assert all(len(mbs) == g for mbs in per_rank)
                assert all(len(mb) <= b for mbs in per_rank for mb in mbs)
                assert sorted(u for mbs in per_rank for mb in mbs for u in mb) == sorted(step)


def test_epochs_cover_every_example_once():
    plan = BatchPlan.build(np.arange(1, 50), batch_size=4, grad_accum=2, packing=False, max_length=64, seed=1)
    for epoch in range(3):
        units = sorted(u for s in plan.epoch_steps(epoch) for u in s)
        assert units == list(range(49))
    assert plan.epoch_steps(0) != plan.epoch_steps(1)  # reshuffled per epoch
    assert plan.epoch_steps(1) == plan.epoch_steps(1)  # deterministic


def test_unpacked_micro_batches_are_laid_out_padding_free():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=400)
    plan = BatchPlan.build(lengths, batch_size=8, grad_accum=1, packing=False, max_length=512, seed=0)
    flat = BatchPlan.build(lengths, batch_size=8, grad_accum=1, packing=False, max_length=512, seed=0, layout="flat")
    for step in plan.epoch_steps(0)[:10]:
        (mb,) = plan.micro_batches(step)
        rows = plan.layout(mb)
        assert sorted(i for r in rows for i in r) == sorted(mb)  # the same 8 examples
        assert flat.layout(mb) == [[u for u in mb]]  # per-example attention: one flat row, no padding
    assert plan.fill() > 0.8  # a padded batch of random lengths would be about half padding
    assert flat.fill() == 1.0


# ----------------------------------------------------------------------------- packed == unpacked
