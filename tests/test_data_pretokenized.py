"""Pre-tokenized rows: labels from TRL's masks, truncation and skips counted (sftune.data.pretokenized)."""

import pytest
from datasets import Dataset

from sftune.config import DataConfig
from sftune.data.one_source import prepare_data
from sftune.data.pretokenized import PretokenizedFormat
from sftune.data.sources import Source, with_row_index
from sftune.data.tokenize import IGNORE
from sftune.errors import DataError


def prepared(rows, tok, completion_only=True, max_length=8):
    ds = Dataset.from_list(rows)
    source = Source(train=with_row_index(ds), eval=None, name="rows", rows_read=len(ds))
    return prepare_data(DataConfig(path="rows"), tok, max_length, source=source,
                        fmt=PretokenizedFormat(completion_only=completion_only))


def test_masks_labels_truncation_and_skips(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    rows = [{"input_ids": [5, 6, 7, eos], "completion_mask": [0, 0, 1, 1], "assistant_masks": [1, 1, 1, 0]},
            {"input_ids": list(range(10, 22)), "completion_mask": [0] * 4 + [1] * 8, "assistant_masks": [1] * 12},
            {"input_ids": list(range(10, 22)), "completion_mask": [0] * 10 + [1] * 2, "assistant_masks": [1] * 12}]
    data = prepared(rows, tiny_tokenizer)
    ids, labels = data.train.example(0)
    assert ids.tolist() == [5, 6, 7, eos] and labels.tolist() == [IGNORE, IGNORE, 7, IGNORE]  # both masks apply
    ids, labels = data.train.example(1)
    assert len(ids) == 8 and labels.tolist() == [IGNORE] * 4 + list(range(14, 18))
    assert data.report.kept == 2 and data.report.truncated == 1
    assert sum(data.report.skipped.values()) == 1  # the third row's completion is past max_length

    whole = prepared(rows[:1], tiny_tokenizer, completion_only=False)  # completion_mask not applied
    assert whole.train.example(0)[1].tolist() == [5, 6, 7, IGNORE]


def test_labels_column_is_used_as_given_and_lengths_are_checked(tiny_tokenizer):
    data = prepared([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}], tiny_tokenizer)
    assert data.train.example(0)[1].tolist() == [IGNORE, 6, 7]
    with pytest.raises(DataError, match="entries for 3 input_ids"):
        prepared([{"input_ids": [5, 6, 7], "completion_mask": [0, 1]}], tiny_tokenizer)
