"""The data position in checkpoints (sftune.data.position): a resume whose data changed is refused,
naming what changed, for streams and in-memory mixtures."""

from __future__ import annotations

import pytest

from conftest import train_config, write_jsonl
from sftune.data.position import restore_position, save_position
from sftune.data.stream import StreamBatches
from sftune.errors import DataError
from test_data_stream import _rows, _stream


def test_changed_data_is_refused_on_resume(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", _rows(20))
    b = write_jsonl(tmp_path / "b.jsonl", _rows(20))
    sig = {"sources": ["a", "b"], "weights": [0.5, 0.5], "tokenizer": "t1"}
    saved = StreamBatches(_stream([a, b], [1, 1], tokenizer=tiny_tokenizer), None, 0, 0, 1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name, content in save_position(sig, saved.state_at(0), 0).items():
        (ckpt / name).write_bytes(content)
    changed = {**sig, "weights": [0.75, 0.25], "tokenizer": "t2"}
    with pytest.raises(DataError, match=r"weights: \[0.5, 0.5\] -> \[0.75, 0.25\]; tokenizer: t1 -> t2"):
        restore_position(changed, ckpt)
    state = restore_position(sig, ckpt)
    assert state["index"] == saved.stream.state_dict()["index"]  # the stream position, to continue from


def test_a_changed_mixture_is_refused_on_resume(tiny_model_dir, tmp_path):
    """An in-memory mixture resumed with other weights: refused before the first step, naming them."""
    from sftune.training import setup, train

    qa = write_jsonl(tmp_path / "qa.jsonl", _rows(20))
    over = {"data.sources": [{"path": str(qa), "weight": 1}, {"path": str(qa), "weight": 1, "label": "again"}],
            "train.max_steps": 2, "train.save_every": 1, "train.batch_size": 2}
    train(train_config(tiny_model_dir, qa, tmp_path / "run", **over))
    over["data.sources"][1]["weight"] = 3
    with pytest.raises(DataError, match=r"weights: \[0.5, 0.5\] -> \[0.25, 0.75\]"):
        setup(train_config(tiny_model_dir, qa, tmp_path / "run", **over, **{"train.resume": True}))
