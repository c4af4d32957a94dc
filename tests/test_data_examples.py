"""The declared example-set interface (sftune.data.examples): every set implements it, and a
stream's examples are named fields that carry extras."""

from __future__ import annotations

import numpy as np

from conftest import write_jsonl
from sftune.config import DataConfig, load_config
from sftune.data.chain import prepare
from sftune.data.examples import ExampleList, ExampleSet, StreamExample


def _rows(n, tag):
    return [{"instruction": f"{tag} question {i}", "output": f"answer {i}"} for i in range(n)]


def test_every_set_implements_the_interface(tiny_tokenizer, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", _rows(8, "a")), write_jsonl(tmp_path / "b.jsonl", _rows(4, "b"))
    one = prepare(DataConfig(path=str(a), template="qa"), tiny_tokenizer, 64).train
    mixed = prepare(load_config(None, {"data.template": "qa", "data.sources": [{"path": str(a)}, {"path": str(b)}]}
                                ).data, tiny_tokenizer, 64).train
    streamed = prepare(load_config(None, {"data.template": "qa", "data.path": str(a), "data.streaming": True,
                                          "data.pack_buffer": 4}).data, tiny_tokenizer, 64).train
    for s in (one, mixed, streamed):
        assert isinstance(s, ExampleSet), type(s)
        assert len(s.lengths) == len(s.rows) == len(s.source) == len(s.n_loss) == len(s)
        ids, labels = s.example(0)
        assert len(ids) == len(labels) == len(s.example_weights(0)) == s.lengths[0]
        assert s.has_extras is False and s.extras(0) == {}
    assert set(one.source.tolist()) == {0} and set(mixed.source.tolist()) == {0, 1}


def test_stream_examples_are_named_and_carry_extras():
    e = StreamExample(np.array([1, 2, 3]), np.array([-100, 2, 3]), None, 1, 7, {"teacher": [0.5]})
    plain = StreamExample(np.array([4, 5]), np.array([-100, 5]), None, 0, 2)
    s = ExampleList([e, plain])
    assert s.has_extras and s.extras(0) == {"teacher": [0.5]} and s.extras(1) == {}
    assert s.source.tolist() == [1, 0] and s.rows.tolist() == [7, 2] and s.n_loss.tolist() == [2, 1]
    assert s.example_weights(1).tolist() == [0.0, 1.0] and not s.weighted
