"""Unit tests of sftune.data.one_source: prepare_data runs every stage (train and held-out eval split,
each with its report), every skip is counted, an all-skipped split is refused with the numbers, and
the tokenization cache key follows the tokenizer."""

import copy

import pytest

from sftune.config import load_config
from sftune.data.one_source import prepare_data, tokenizer_signature
from sftune.errors import DataError
from sftune.model import load_tokenizer

from conftest import write_jsonl


def data_config(model_dir, path, **over):
    return load_config(None, {"model.path": str(model_dir), "data.path": str(path), "data.template": "qa", **over})


def test_train_and_eval_splits_with_their_reports(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}" if i != 3 else ""} for i in range(20)]
    cfg = data_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", rows), **{"data.eval_split": 0.25})
    tok, _ = load_tokenizer(cfg)
    data = prepare_data(cfg.data, tok, 64)
    assert data.report.rows_used + data.eval_report.rows_used == 20 and data.eval_report.rows_used == 5
    assert sum(data.report.skipped.values()) + sum(data.eval_report.skipped.values()) == 1  # the empty output
    assert len(data.train) == data.report.kept and len(data.eval) == data.eval_report.kept
    ids, labels = data.train.example(0)
    assert len(ids) == len(labels) == data.train.lengths[0] and labels[-1] == tok.eos_token_id
    assert data.fmt.name == "prompt_completion" and data.max_length == 64


def test_a_max_length_that_leaves_nothing_to_learn_names_the_length_needed(tiny_model_dir, tmp_path):
    rows = [{"instruction": "word " * 30, "output": "x"}] * 4
    cfg = data_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", rows))
    tok, _ = load_tokenizer(cfg)
    with pytest.raises(DataError, match=r"data.max_length=8 leaves no trained token .* data.max_length >= \d+"):
        prepare_data(cfg.data, tok, 8)


def test_tokenizer_signature_changes_with_the_chat_template(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    assert tokenizer_signature(other) == tokenizer_signature(tiny_tokenizer)
    other.chat_template = "{{ messages }}"
    assert tokenizer_signature(other) != tokenizer_signature(tiny_tokenizer)


def test_a_damaged_tokenized_cache_is_rebuilt_never_read(tiny_model_dir, tmp_path, capsys):
    """The cached tokenization carries a digest beside it; bytes changed in the middle of the Arrow file
    (its size intact) are found before the cache is read: a one-line note, the cache rebuilt, the same ids."""
    from pathlib import Path

    from sftune.data.sources import load_source
    from sftune.digests import SIDECAR, sidecar_check

    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(30)]
    cfg = data_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", rows))
    tok, _ = load_tokenizer(cfg)
    first = prepare_data(cfg.data, tok, 64)
    folder = Path(load_source(cfg.data).train.cache_files[0]["filename"]).parent
    cached = [f for f in folder.glob("cache-*.arrow") if Path(str(f) + SIDECAR).exists()]
    assert len(cached) == 1 and sidecar_check(cached[0]) is None
    data = bytearray(cached[0].read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    cached[0].write_bytes(bytes(data))
    capsys.readouterr()
    again = prepare_data(cfg.data, tok, 64)
    assert f"the tokenized data cache {cached[0]} is damaged" in capsys.readouterr().err
    assert sidecar_check(cached[0]) is None  # rebuilt, with a fresh digest
    assert (again.train.ids == first.train.ids).all() and (again.train.labels == first.train.labels).all()
