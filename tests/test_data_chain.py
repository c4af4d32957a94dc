"""The run's data (``sftune.data.chain.prepare``): one source is the one-source pipeline itself, a
mixture carries its signature (what a resume must match), and rows passed from Python are refused
beside ``data.sources``."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from sftune.config import DataConfig, load_config
from sftune.data.chain import prepare
from sftune.data.one_source import prepare_data
from sftune.data.sources import load_source
from sftune.errors import ConfigError


def _rows(n, tag):
    return [{"instruction": f"{tag} question {i}", "output": f"answer {i}"} for i in range(n)]


def test_one_source_is_the_pipeline(tiny_tokenizer, tmp_path):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", _rows(12, "a"))), template="qa")
    data, plain = prepare(cfg, tiny_tokenizer, 64), prepare_data(cfg, tiny_tokenizer, 64)
    assert data.signature is None and len(data.train) == len(plain.train) == 12
    assert all((data.train.example(i)[0] == plain.train.example(i)[0]).all() for i in range(12))


def test_a_mixture_has_sources_and_a_signature(tiny_tokenizer, tmp_path):
    a, b = write_jsonl(tmp_path / "a.jsonl", _rows(12, "a")), write_jsonl(tmp_path / "b.jsonl", _rows(6, "b"))
    cfg = load_config(None, {"data.template": "qa", "data.sources": [{"path": str(a), "weight": 3},
                                                                   {"path": str(b), "weight": 1}]}).data
    data = prepare(cfg, tiny_tokenizer, 64, seed=3)
    assert data.signature is not None and set(int(s) for s in data.train.source) == {0, 1}
    assert [s["label"] for s in data.report.sources] == [str(a), str(b)]


def test_python_rows_beside_sources_are_refused(tiny_tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _rows(4, "a"))
    cfg = load_config(None, {"data.template": "qa", "data.sources": [{"path": str(a)}]}).data
    with pytest.raises(ConfigError, match="data.sources"):
        prepare(cfg, tiny_tokenizer, 64, source=load_source(DataConfig(path=str(a))))


def test_a_stream_has_no_epoch_and_its_report_counts_what_was_trained(tiny_tokenizer, tmp_path):
    """A stream has no length: its progress is the examples and tokens trained, never an epoch of
    the peek window, and its report's totals come from what was read and trained."""
    from sftune.data.chain import plan

    a = write_jsonl(tmp_path / "a.jsonl", _rows(40, "a"))
    cfg = load_config(None, {"data.template": "qa", "data.path": str(a), "data.streaming": True,
                             "data.pack_buffer": 8, "train.max_steps": 6, "train.batch_size": 4})
    data = prepare(cfg.data, tiny_tokenizer, 64, seed=cfg.train.seed)
    feed = plan(cfg, data, 0)
    assert feed.streamed and feed.epoch(3) is None
    assert data.report.rows_read == 0 and data.report.sources[0]["examples_trained"] == 0  # nothing trained yet
    for step in range(6):
        feed(step)
    progress = feed.progress(6)
    assert "epoch" not in progress and progress["examples_seen"] > 0 and progress["tokens_seen"] > 0
    sources = feed.finish()
    rep = data.report
    assert rep.rows_read >= rep.kept == sources[0]["kept"] > 0
    assert rep.total_tokens == progress["tokens_seen"] == sources[0]["tokens_trained"]
    assert 0 < rep.loss_tokens < rep.total_tokens and rep.length_percentiles["p50"] > 0
    # in memory, the same plan has epochs and no stream position
    mem = plan(cfg.model_copy(update={"data": cfg.data.model_copy(update={"streaming": False})}),
               prepare(DataConfig(path=str(a), template="qa"), tiny_tokenizer, 64), 0)
    assert mem.epoch(mem.plan.steps_per_epoch) == 1.0 and mem.position_files(1) == {} and mem.finish() is None
