"""The extras seam: payloads ride with their examples through collate to the model and the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftune.data import extras
from sftune.data.packing import BatchPlan, collate


def _tagging(placed, batch):
    """A test kind: a per-token model input (the example's tag at each of its tokens) and one
    loss-position tensor (the tag of the example each loss position is in)."""
    tags = torch.zeros(batch.input_ids.shape, dtype=torch.long)
    for p in placed:
        tags[p.row, p.offset:p.offset + p.length] = p.payload
    batch.model_inputs["tags"] = tags
    batch.loss_extras["tag_at_loss"] = tags.view(-1).index_select(0, batch.loss_index)


extras.register("test_tag", _tagging)


def test_collate_places_payloads_in_batch_order():
    a = ([1, 2, 3], [-100, 2, 3], None, {"test_tag": 7})
    b = ([4, 5], [-100, 5], None, {"test_tag": 9})
    c = ([6, 7, 8], [-100, 7, 8])  # no extras: tag 0
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch.model_inputs["tags"].tolist() == [[7, 7, 7, 9, 9], [0, 0, 0, 0, 0]]
    # loss positions: targets shifted within each example
    assert batch.loss_extras["tag_at_loss"].tolist() == [7, 7, 9, 0, 0]
    moved = batch.to("cpu")
    assert moved.inputs("cpu")["model_inputs"]["tags"].shape == (2, 5)


def test_text_batches_carry_nothing():
    batch = collate([[([1, 2, 3], [-100, 2, 3])]], pad_id=0)
    assert batch.model_inputs == {} and batch.loss_extras == {}
    assert "model_inputs" not in batch.inputs("cpu")


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="no module collates"):
        collate([[([1, 2], [-100, 2], None, {"nobody": 1})]], pad_id=0)


class _Set:
    weighted, has_extras = False, True

    def __init__(self):
        self.items = [(np.array([1, 2, 3]), np.array([-100, 2, 3])), (np.array([4, 5]), np.array([-100, 5]))]
        self.lengths = np.array([3, 2])

    def __len__(self):
        return 2

    def example(self, i):
        return self.items[i]

    def extras(self, i):
        return {"test_tag": i + 1}


def test_batch_plan_reads_extras_from_the_set():
    data = _Set()
    plan = BatchPlan.build(data.lengths, batch_size=2, grad_accum=1, packing=False, max_length=8, seed=0)
    batch = plan.batch([0, 1], data, pad_id=0)
    assert sorted(set(batch.model_inputs["tags"].view(-1).tolist()) - {0}) == [1, 2]
