"""Packing and batching: BFD, per-example shifted targets, step composition, packed == unpacked."""

import numpy as np
import pytest
import torch
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
    flat = BatchPlan.build(lengths, batch_size=8, grad_accum=1, packing=False, max_length=512, seed=0, flat=True)
    for step in plan.epoch_steps(0)[:10]:
        (mb,) = plan.micro_batches(step)
        rows = plan.layout(mb)
        assert sorted(i for r in rows for i in r) == sorted(mb)  # the same 8 examples
        assert flat.layout(mb) == [[u for u in mb]]  # per-example attention: one flat row, no padding
    assert plan.fill() > 0.8  # a padded batch of random lengths would be about half padding
    assert flat.fill() == 1.0


# ----------------------------------------------------------------------------- packed == unpacked


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sftune_varlen"])
def test_packed_loss_equals_unpacked(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    from sftune.attention import enable_varlen
    from sftune.loss import CausalLMWithLoss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager" if attn == "eager"
                                                 else "sdpa", dtype=torch.float32)
    if attn == "sftune_varlen":
        assert enable_varlen(model)
    lm = CausalLMWithLoss(model).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 3, 20):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        examples.append((ids, labels))

    def loss(rows):
        b = collate(rows, pad_id=0)
        return lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds), b.n_loss

    with torch.no_grad():
        one_by_one = [loss([[e]]) for e in examples]
        packed_sum, packed_n = loss([examples])  # all four in one row
        two_rows_sum, _ = loss([examples[:2], examples[2:]])
        padded_sum, _ = loss([[e] for e in examples])  # unpacked, right-padded batch
    total = sum(s for s, _ in one_by_one)
    assert packed_n == sum(n for _, n in one_by_one)
    torch.testing.assert_close(packed_sum, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_rows_sum, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_sum, total, rtol=1e-5, atol=1e-5)


def test_varlen_attention_gradients_match_per_example(tiny_model_dir):
    """Per-example attention in one flat row: loss and every parameter gradient equal the sum over
    the examples run one at a time."""
    from transformers import AutoModelForCausalLM

    from sftune.attention import enable_varlen
    from sftune.loss import CausalLMWithLoss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert enable_varlen(model)
    lm = CausalLMWithLoss(model)
    examples = [(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (9, 4, 15)]
    flat = collate([examples], pad_id=0)
    assert flat.doc_bounds == (0, 9, 13, 28)
    lm(flat.input_ids, flat.position_ids, flat.loss_index, flat.loss_targets, flat.doc_bounds).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for e in examples:
        b = collate([[e]], pad_id=0)
        lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_packed_per_example_logits_match(tiny_model_dir):
    """Stronger than the summed loss: every position's logits match the example run alone.

    ``use_cache=False`` matters: with a KV cache, transformers does not derive per-example masks
    from ``position_ids`` (CausalLMWithLoss always passes it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    a, b = list(range(5, 15)), list(range(20, 26))
    with torch.no_grad():
        la = model(torch.tensor([a])).logits[0]
        lb = model(torch.tensor([b])).logits[0]
        packed = model(torch.tensor([a + b]), position_ids=torch.tensor([list(range(10)) + list(range(6))]),
                       use_cache=False).logits[0]
    torch.testing.assert_close(packed[:10], la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[10:], lb, rtol=1e-5, atol=1e-5)
