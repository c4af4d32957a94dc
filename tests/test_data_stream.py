"""Streaming (sftune.data.stream, sftune.data.readers): readers resume by cursor, the stream's
position round-trips exactly (inside a packing window, after a pass ended, twice), the stream reads
only a bounded window, two ranks share each step, and a streamed run resumes bit-exactly."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from conftest import train_config, write_jsonl
from sftune.config import DataConfig, load_config
from sftune.data.mixture import resolve_sources
from sftune.data.stream import Stream, StreamBatches


def _rows(n, tag="r"):
    return [{"instruction": f"{tag}{i} " * (1 + i % 5), "output": f"a{i} " * (1 + i % 3)} for i in range(n)]


def _stream(files, weights, *, packing=True, pack_buffer=8, shuffle_buffer=4, seed=0, tokenizer=None, **data):
    sources = [{"path": str(f), "weight": w} for f, w in zip(files, weights)]
    cfg = load_config(None, {"data.sources": sources, "data.template": "qa", **{f"data.{k}": v for k, v in data.items()}})
    return Stream(resolve_sources(cfg.data), tokenizer, 64, seed=seed, packing=packing, pack_buffer=pack_buffer,
                  shuffle_buffer=shuffle_buffer)


def _units(stream, n):
    return [[(e.ids.tolist(), e.labels.tolist(), e.source, e.row) for e in stream.next_unit()] for _ in range(n)]


@pytest.mark.parametrize("packing", [True, False])
def test_stream_position_round_trips(tmp_path, tiny_tokenizer, packing):
    small = write_jsonl(tmp_path / "small.jsonl", _rows(7, "s"))  # ends its pass many times
    big = write_jsonl(tmp_path / "big.jsonl", _rows(300, "b"))
    ref = _stream([small, big], [1, 1], packing=packing, tokenizer=tiny_tokenizer)
    expected = _units(ref, 60)
    assert ref.buffers[0].reader.cursor["pass"] >= 2  # the small source ran out and started new passes
    assert {e[2] for u in expected for e in u} == {0, 1}
    for cut in (3, 13, 31):  # inside packing windows (8 examples each) and across passes
        s = _stream([small, big], [1, 1], packing=packing, tokenizer=tiny_tokenizer)
        assert _units(s, cut) == expected[:cut]
        state = pickle.loads(pickle.dumps(s.state_dict()))
        again = _stream([small, big], [1, 1], packing=packing, tokenizer=tiny_tokenizer)
        again.load_state_dict(state)
        assert _units(again, 10) == expected[cut:cut + 10]
        third = _stream([small, big], [1, 1], packing=packing, tokenizer=tiny_tokenizer)  # a second resume
        third.load_state_dict(pickle.loads(pickle.dumps(again.state_dict())))
        assert _units(third, 60 - cut - 10) == expected[cut + 10:]


def test_resume_does_not_reread_what_was_consumed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(200))
    s = _stream([path], [1], tokenizer=tiny_tokenizer, shuffle_buffer=1)
    _units(s, 20)
    state = s.state_dict()
    offset = state["sources"][0]["cursor"]["offset"]
    assert 0 < offset < path.stat().st_size
    rest = _units(s, 5)
    data = path.read_bytes()  # the consumed lines (but the first) become garbage: a re-read would fail
    first = data.index(b"\n") + 1
    path.write_bytes(data[:first] + b"#" * (offset - first - 1) + b"\n" + data[offset:])
    again = _stream([path], [1], tokenizer=tiny_tokenizer, shuffle_buffer=1)
    again.load_state_dict(state)
    assert _units(again, 5) == rest


def test_stream_reads_a_bounded_window(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "big.jsonl", _rows(20_000))
    s = _stream([path], [1], tokenizer=tiny_tokenizer, shuffle_buffer=100, pack_buffer=32)
    _units(s, 3)
    assert s.buffers[0].reader.cursor["read"] <= 100 + 64 + 1  # shuffle buffer + one tokenized chunk


def test_stream_equals_in_memory_on_the_same_rows(tmp_path, tiny_tokenizer):
    from sftune.data.one_source import prepare_data

    path = write_jsonl(tmp_path / "d.jsonl", _rows(40))
    mem = prepare_data(DataConfig(path=str(path), template="qa"), tiny_tokenizer, 64)
    s = _stream([path], [1], packing=False, shuffle_buffer=1, tokenizer=tiny_tokenizer)
    streamed = _units(s, 40)
    for i, unit in enumerate(streamed):
        ids, labels = mem.train.example(i)
        assert unit == [(ids.tolist(), labels.tolist(), 0, i)]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.slow
def test_streamed_mixture_resumes_bit_exactly(tiny_model_dir, tmp_path):
    """Interrupted inside a packing window, resumed, interrupted again, resumed: the losses and
    weights equal the uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    from sftune.training import loop, setup, train

    qa = write_jsonl(tmp_path / "qa.jsonl", _rows(12))  # runs out: several passes
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"story {i} " * (2 + i % 7)} for i in range(80)])
    over = {"data.sources": [{"path": str(qa), "template": "qa", "weight": 3, "label": "qa"},
                             {"path": str(text), "format": "text", "weight": 1}], "data.template": None,
            "data.streaming": True, "data.packing": True, "data.pack_buffer": 16, "data.shuffle_buffer": 8,
            "train.max_steps": 8, "train.batch_size": 2}
    train(train_config(tiny_model_dir, qa, tmp_path / "full", **over))

    for resume, at_unit in ((False, 7), (True, 5)):  # units 7 (step 3) and 5 after the resume (step 6)
        run = setup(train_config(tiny_model_dir, qa, tmp_path / "cut", **over, **{"train.resume": resume}))
        stream, taken = run.feed.batches.stream, {"n": 0}
        next_unit = stream.next_unit

        def interrupting(next_unit=next_unit, taken=taken, at_unit=at_unit):
            taken["n"] += 1
            if taken["n"] == at_unit:
                raise KeyboardInterrupt
            return next_unit()

        stream.next_unit = interrupting
        assert loop(run).interrupted
    train(train_config(tiny_model_dir, qa, tmp_path / "cut", **over, **{"train.resume": True}))

    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9)) and cut == full
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rep = json.loads((tmp_path / "cut" / "data_report.json").read_text())
    assert [s["label"] for s in rep["sources"]] == ["qa", str(text)]
    assert sum(s["examples_trained"] for s in rep["sources"]) == \
        sum(s["examples_trained"] for s in json.loads((tmp_path / "full" / "data_report.json").read_text())["sources"])
    assert rep["sources"][0]["passes"] >= 1
    assert np.isclose(rep["sources"][0]["achieved_share"], 0.75, atol=0.15)

    from sftune.cli import main  # a streamed mixture's run evaluates on one file, in memory

    assert main(["eval", str(tmp_path / "full"), "--data", str(qa), "--limit", "2", "--max-new-tokens", "4"]) == 0


def test_two_ranks_train_disjoint_examples_whose_union_is_one_process(tmp_path, tiny_tokenizer):
    from sftune.data.packing import BatchPlan

    small = write_jsonl(tmp_path / "small.jsonl", _rows(9, "s"))
    big = write_jsonl(tmp_path / "big.jsonl", _rows(200, "b"))

    def batches(rank, world, batch_size):
        plan = BatchPlan.build([1], batch_size=batch_size, grad_accum=2, world_size=world, packing=True,
                               max_length=64, seed=0)
        return StreamBatches(_stream([small, big], [1, 2], tokenizer=tiny_tokenizer), plan, 0, rank, world)

    one, r0, r1 = batches(0, 1, 4), batches(0, 2, 2), batches(1, 2, 2)
    for step in range(6):
        for m1, a, b in zip(one(step), r0(step), r1(step)):
            assert a.real_tokens and b.real_tokens  # each rank trains its own share
            assert a.real_tokens + b.real_tokens == m1.real_tokens
            both = sorted(a.loss_targets.tolist() + b.loss_targets.tolist())
            assert both == sorted(m1.loss_targets.tolist())


@pytest.mark.slow
@pytest.mark.distributed
def test_streamed_two_ranks_equal_one_process(tiny_model_dir, tmp_path):
    """torchrun, 2 CPU ranks x batch 2 == 1 process x batch 4, on a streamed two-source mixture."""
    from test_distributed import losses, overrides, torchrun

    from sftune.training import train

    qa = write_jsonl(tmp_path / "qa.jsonl", _rows(15))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"story {i} " * (2 + i % 7)} for i in range(50)])
    sources = [{"path": str(qa), "template": "qa", "weight": 2}, {"path": str(text), "format": "text", "weight": 1}]
    extra = {"data.sources": json.dumps(sources), "data.template": "null", "data.streaming": "true",
             "data.packing": "true", "data.pack_buffer": 12, "data.shuffle_buffer": 4, "data.max_length": 64,
             "train.grad_accum": 2}
    train(load_config("codealpaca", overrides(tiny_model_dir, qa, tmp_path / "one", **{
        **extra, "data.sources": sources, "data.template": None, "data.streaming": True, "data.packing": True,
        "train.batch_size": 4})))
    torchrun(overrides(tiny_model_dir, qa, tmp_path / "two", **{**extra, "train.batch_size": 2}))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)


def test_preview_json_shows_the_stream_in_order_with_sources(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from sftune.cli import main

    qa = write_jsonl(tmp_path / "qa.jsonl", _rows(20))
    sources = [{"path": str(qa), "weight": 1, "label": "one"}, {"path": str(qa), "weight": 1, "label": "two"}]
    args = ["preview", "codealpaca", f"model.path={tiny_model_dir}", "data.streaming=true",  # no max_steps: none trained
            "data.sources=" + json.dumps(sources), "-n", "6", "--json"]
    assert main(args) == 0
    seqs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(seqs) == 6 and {s["source"] for s in seqs} == {"one", "two"}
    s = _stream([qa, qa], [1, 1], packing=False, tokenizer=tiny_tokenizer, seed=42, shuffle_buffer=1000)
    first = [u[0][0] for u in _units(s, 64)]
    shown = []  # each sequence is a training row: its examples start where position_ids restart
    for q in seqs:
        starts = [k for k, p in enumerate(q["position_ids"]) if p == 0] + [len(q["input_ids"])]
        shown += [q["input_ids"][a:b] for a, b in zip(starts, starts[1:])]
    assert shown and all(e in first for e in shown)  # the stream's first examples (by length in each step)
