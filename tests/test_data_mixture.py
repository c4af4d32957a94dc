"""Weighted mixtures of sources (sftune.data.mixture): shares, determinism, accounting, preview."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import train_config, write_jsonl
from sftune.config import load_config
from sftune.data.mixture import Mixture, draw, mixed_epoch, resolve_sources
from sftune.errors import ConfigError


@pytest.mark.parametrize("weights", [[1, 1], [3, 1], [1, 2, 7], [0.05, 0.95]])
def test_achieved_shares_match_the_weights(weights):
    n = 20_000
    src = Mixture(weights, seed=3).sources(0, n)
    shares = np.bincount(src, minlength=len(weights)) / n
    target = np.asarray(weights) / sum(weights)
    assert np.all(np.abs(shares - target) * n <= 5)
    for start in (0, 17, 999, 12_345):  # any window of 100 consecutive examples: within 5 of its share
        window = np.bincount(src[start:start + 100], minlength=len(weights))
        assert np.all(np.abs(window - 100 * target) <= 5), (start, window)


def test_mixture_is_a_function_of_seed_and_index_only():
    m = Mixture([2, 1, 1], seed=7)
    whole = m.sources(0, 5000)
    for workers in (1, 2, 3, 8):  # any split of the index range into workers' chunks reads the same
        bounds = np.linspace(0, 5000, workers + 1).astype(int)
        parts = [Mixture([2, 1, 1], seed=7).sources(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        assert np.array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(Mixture([2, 1, 1], seed=8).sources(0, 5000), whole)


def test_a_source_that_runs_out_starts_a_new_shuffled_pass():
    src, ex, draws = draw(Mixture([9, 1], 0), [10, 1000], 0, 0, 100)
    first = ex[src == 0]
    assert draws[0] == len(first) and abs(len(first) - 90) <= 3
    for p in range(9):  # every pass is a permutation of the source, each in a new order
        assert sorted(first[10 * p:10 * p + 10]) == list(range(10))
    assert len({tuple(first[10 * p:10 * p + 10]) for p in range(9)}) > 1
    assert len(set(ex[src == 1])) == draws[1]  # the big source has not finished a pass: no repeats


class _Set:
    def __init__(self, lengths):
        self.lengths = np.asarray(lengths)
        self.rows = np.arange(len(lengths))
        self.n_loss = self.lengths // 2
        self.w_loss = self.n_loss.astype(float)
        self.weighted = self.has_extras = False
        self.source = np.zeros(len(lengths), dtype=np.int64)

    def __len__(self):
        return len(self.lengths)


def test_one_source_is_the_identity():
    part = _Set(np.arange(3, 40))
    mixed, draws = mixed_epoch([part], [1.0], seed=5)
    assert np.array_equal(mixed.index, np.arange(len(part))) and draws.tolist() == [len(part)]
    assert np.array_equal(mixed.lengths, part.lengths)
    specs = resolve_sources(load_config(None, {"data.path": "x.jsonl"}).data)
    assert len(specs) == 1 and specs[0].weight == 1.0 and specs[0].cfg.path == "x.jsonl"


def test_sources_inherit_the_top_level_keys():
    cfg = load_config(None, {"data.template": "qa", "data.max_length": 64, "data.sources": [
        {"path": "a.jsonl", "weight": 3}, {"path": "b.jsonl", "template": "alpaca", "label": "B"},
        {"path": "a.jsonl"}]}).data
    a, b, a2 = resolve_sources(cfg)
    assert (a.cfg.template, b.cfg.template, a.cfg.max_length) == ("qa", "alpaca", 64)
    assert (a.weight, b.weight) == (0.6, 0.2)
    assert (a.label, b.label, a2.label) == ("a.jsonl", "B", "a.jsonl #2")


def test_bad_source_keys_are_clear_errors():
    with pytest.raises(ConfigError, match="promt.*data.prompt"):
        load_config(None, {"data.sources": [{"path": "a.jsonl", "promt": "x"}]})
    with pytest.raises(ConfigError, match="weight"):
        load_config(None, {"data.sources": [{"path": "a.jsonl", "weight": 0}]})
    from sftune.data.chain import require_steps

    with pytest.raises(ConfigError, match="train.max_steps"):  # training asks for it; preview does not
        require_steps(load_config(None, {"data.streaming": True}))


@pytest.fixture()
def two_sources(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"q{i} " * (1 + i % 5), "output": f"a{i} " * (1 + i % 3)}
                                              for i in range(30)])
    rows = [{"text": f"story {i} " * (2 + i % 7)} for i in range(60)]
    rows[4]["text"] = None  # a bad row, skipped and counted for this source
    text = write_jsonl(tmp_path / "text.jsonl", rows)
    return qa, text


def _mixture_overrides(qa, text, **over):
    return {"data.sources": [{"path": str(qa), "template": "qa", "weight": 3, "label": "qa"},
                             {"path": str(text), "format": "text", "weight": 1, "on_bad_row": "skip"}],
            "data.template": None, **over}


def test_two_sources_train_with_the_shares_reported(tiny_model_dir, two_sources, tmp_path):
    from sftune.training import train

    qa, text = two_sources
    cfg = train_config(tiny_model_dir, qa, tmp_path / "run", **_mixture_overrides(qa, text), **{
        "train.max_steps": 6, "train.batch_size": 8})
    train(cfg)
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    a, b = rep["sources"]
    assert (a["label"], b["label"]) == ("qa", str(text))
    assert (a["rows_read"], a["kept"], b["rows_read"], b["kept"]) == (30, 30, 60, 59)
    assert sum(b["skipped"].values()) == 1 and "text.jsonl: " in next(iter(rep["skipped"]))
    assert a["draws_per_epoch"] + b["draws_per_epoch"] == 89
    assert abs(a["share_per_epoch"] - 0.75) < 0.03 and a["passes"] > 1  # the small source repeats
    assert a["examples_trained"] + b["examples_trained"] == 48
    assert abs(a["achieved_share"] - 0.75) < 0.15
    assert a["tokens_trained"] > 0 and b["tokens_trained"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data_sources"] for r in records if "data_sources" in r] == [rep["sources"]]
    assert "## Sources" in (tmp_path / "run" / "report.md").read_text()


def test_preview_json_has_the_source_in_training_order(tiny_model_dir, two_sources, tmp_path, capsys):
    qa, text = two_sources
    over = _mixture_overrides(qa, text)
    args = ["preview", "codealpaca", f"model.path={tiny_model_dir}", "data.template=null",
            "data.sources=" + json.dumps(over["data.sources"]), "-n", "12", "--json"]
    from sftune.cli import main

    assert main(args) == 0
    out = capsys.readouterr().out
    seqs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(seqs) == 12
    assert {s["source"] for s in seqs} == {"qa", str(text)}
    assert all(("Question" in s["text"]) == (s["source"] == "qa") for s in seqs)


def test_a_source_gaining_extras_after_mixing_shows_through():
    """A source's set may gain a kind after the mixture is built (a teacher's saved rows,
    sftune.distill.saved): the mixture asks its sources at each batch and routes each draw's payload."""
    from types import SimpleNamespace

    from sftune.data.mixture import MixedSet

    def part(n):
        ones = np.ones(n, dtype=np.int64)
        return SimpleNamespace(lengths=ones, rows=np.arange(n), n_loss=ones, w_loss=ones * 1.0, weighted=False,
                               has_extras=False, extras=lambda i: {"teacher": i})

    a, b = part(2), part(3)
    mixed = MixedSet([a, b], [1, 0, 1, 1], [2, 1, 2, 0])
    assert not mixed.has_extras
    b.has_extras = True
    assert mixed.has_extras
    assert [mixed.extras(i) for i in range(4)] == [{"teacher": 2}, {}, {"teacher": 2}, {"teacher": 0}]
