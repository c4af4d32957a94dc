"""The saved path over a stream (sftune.distill.saved_stream): sftune distill-prepare reads each streamed
source's first pass and keys its rows by file, row and part; training from them equals the live teacher
on one source and on a two-source streamed mixture (one of them two files), resumes bit-exactly
mid-stream, refuses rows made for other data at the first example that differs (naming source and
row), and prepare resumes by shard without reading the finished shards' rows again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from sftune.cli import main
from sftune.distill.saved_stream import HEAD, check_of, row_key
from sftune.errors import ConfigError
from sftune.training import train

from conftest import QA_ROWS, build_model_dir, train_config, write_jsonl
from distill_helpers import prepare_saved, records, resumed_at_step_2

pytestmark = pytest.mark.usefixtures("no_plots")

STREAM = {"data.max_length": 64, "train.max_steps": 3, "train.batch_size": 4, "data.streaming": True,
          "data.shuffle_buffer": 8, "data.pack_buffer": 8}
ONE = {**STREAM, "data.limit": 24}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """Plain text in two files (one bad row, skipped): keys name the file."""
    rows = [{"text": f"story {i} " * (2 + i % 7)} for i in range(13)]
    rows[4]["text"] = None
    d = tmp_path_factory.mktemp("text") / "stories"
    d.mkdir()
    write_jsonl(d / "train-00000.jsonl", rows[:6])
    write_jsonl(d / "train-00001.jsonl", rows[6:])
    return d


def mixture(qa, text, w_text=1.0):
    """qa (16 rows a pass), stories (two files) and qa again with 8 rows a pass (its rows: the first qa's)."""
    return {"data.sources": [{"path": str(qa), "template": "qa", "label": "qa", "limit": 16},
                             {"path": str(text), "format": "text", "weight": w_text, "on_bad_row": "skip",
                              "label": "stories"},
                             {"path": str(qa), "template": "qa", "label": "short qa", "limit": 8, "weight": 0.5}],
            "data.template": None}


@pytest.fixture(scope="module")
def saved_one(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path_factory):
    return prepare_saved(tmp_path_factory, "saved_one", tiny_model_dir, qa_rows_file,
                         {**ONE, "distill.teacher": str(teacher_dir)})


@pytest.fixture(scope="module")
def saved_mix(tiny_model_dir, teacher_dir, qa_rows_file, text_dir, tmp_path_factory):
    return prepare_saved(tmp_path_factory, "saved_mix", tiny_model_dir, qa_rows_file,
                         {**STREAM, **mixture(qa_rows_file, text_dir), "distill.teacher": str(teacher_dir)})


def shard_rows(d: Path) -> list[tuple]:
    out = []
    for p in sorted((d / "shards").iterdir()):
        t = datasets.load_from_disk(str(p))
        out += list(zip(t["key"], t["check"], t["target"]))
    return out


def test_prepare_keys_rows_by_file_and_row(saved_one, saved_mix):
    out, _ = saved_one
    one = json.loads((out / "manifest.json").read_text())
    done = json.loads((out / "done.json").read_text())
    assert one["streamed"] and one["limit"] == 24 and one["files"] == ["qa.jsonl"]
    kept = [i for i, r in enumerate(QA_ROWS[:24]) if len((r["instruction"] + r["output"]).split()) < 24]
    keys = [k for k, _, _ in shard_rows(out)]
    assert done["rows"] == 24 and 0 < done["examples"] < 24 and len(keys) == done["examples"]
    assert keys == sorted(keys) and keys[0] == row_key(0, 0, 0) and set(k >> 10 for k in keys) <= set(range(24))
    assert len(keys) <= len(kept) + 4  # the rows too long for 64 tokens are skipped: their numbers are not keys
    mix, _ = saved_mix
    top = json.loads((mix / "manifest.json").read_text())
    qa, text, short = top["sources"]
    assert (qa["dir"], text["dir"], short["dir"]) == ("sources/00-qa", "sources/01-stories", "sources/00-qa")
    assert json.loads((mix / qa["dir"] / "manifest.json").read_text())["limit"] == 16  # the longer pass
    stories = json.loads((mix / text["dir"] / "manifest.json").read_text())
    assert stories["files"] == ["train-00000.jsonl", "train-00001.jsonl"]
    text_keys = [k for k, _, _ in shard_rows(mix / text["dir"])]
    assert len(text_keys) == 12 and row_key(1, 0, 0) in text_keys and row_key(0, 4, 0) not in text_keys  # row 4: bad


def test_prepare_resumes_by_shard(saved_mix, monkeypatch):
    out, args = saved_mix
    d = out / json.loads((out / "manifest.json").read_text())["sources"][1]["dir"]
    before = shard_rows(d)
    shards = sorted((d / "shards").iterdir())
    assert len(shards) == 3  # 12 examples, at least 5 a shard, each ending at a row
    shutil.rmtree(shards[-1])
    shutil.copytree(shards[0], d / "shards" / "shard-00003")  # a stale shard after the missing one: dropped
    (d / "done.json").unlink()
    (d / "shards" / "shard-00002.tmp").mkdir()  # a shard cut short is written again
    kept = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    starts = []
    import sftune.data.stream as stream_mod

    real = stream_mod.RowReader

    def recorded(cfg, index, seed, cursor=None):  # where the rerun reads from
        starts.append((index, cursor))
        return real(cfg, index, seed, cursor)

    monkeypatch.setattr(stream_mod, "RowReader", recorded)
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()) and shards[-1].exists()
    assert not (d / "shards" / "shard-00002.tmp").exists() and (d / "done.json").exists()
    assert sorted(p.name for p in (d / "shards").iterdir()) == [p.name for p in shards]
    assert shard_rows(d) == before
    cursors = [c for i, c in starts if i == 1 and c is not None]  # the stories' rows: after the 2nd shard's last
    assert len(cursors) == 1 and cursors[0]["in_pass"] == json.loads((shards[1] / "shard.json").read_text())[
        "cursor"]["in_pass"] > 5


@pytest.mark.parametrize("case", ["one", "mixture"])
def test_saved_equals_live_on_a_stream(case, saved_one, saved_mix, tiny_model_dir, teacher_dir, qa_rows_file,
                                       text_dir, tmp_path):
    """The key proof: every step's losses from the saved rows equal the live teacher's on the same stream."""
    if case == "one":
        out, over = saved_one[0], {**ONE, "distill.loss": "jsd", "distill.beta": 0.5, "distill.alpha": 0.7}
    else:
        out, over = saved_mix[0], {**STREAM, **mixture(qa_rows_file, text_dir, w_text=3.0), "train.seed": 7,
                                   "train.max_steps": 4, "distill.top_k": 12, "distill.top_k_tail": "bucket"}
    live = {"distill.teacher": str(teacher_dir)}
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "live", **over, **live))
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "saved", **over, **{"distill.saved": str(out)}))
    a, b = records(tmp_path / "live"), records(tmp_path / "saved")
    assert sorted(a) == sorted(b) and len(a) == over["train.max_steps"]
    for step in a:
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert b[1]["distill"]["how"] == "saved"
    if case == "mixture":  # the small sources ran past their first pass: rows were looked up again
        report = json.loads((tmp_path / "saved" / "data_report.json").read_text())
        assert max(s["passes"] for s in report["sources"]) > 1  # passes after the first read the files reordered


def test_resume_mid_stream_is_bit_exact(saved_mix, dropout_model_dir, qa_rows_file, text_dir, tmp_path):
    out, _ = saved_mix
    over = {**STREAM, **mixture(qa_rows_file, text_dir, w_text=2.0), "train.max_steps": 4, "train.save_every": 2,
            "train.keep_checkpoints": 5, "distill.saved": str(out), "distill.alpha": 0.5, "distill.top_k": 20}
    full, resumed = resumed_at_step_2(
        lambda out, **more: train_config(dropout_model_dir, qa_rows_file, out, **over, **more), tmp_path)
    for step in (3, 4):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_other_data_is_refused_at_the_first_example_that_differs(saved_one, tiny_model_dir, qa_rows_file, tmp_path):
    """Checked as each example is batched, and each source's first examples and the first window at start-up."""
    out, _ = saved_one
    more = {**ONE, "train.max_steps": 8}
    rows = [dict(r) for r in QA_ROWS]
    kept = sorted(k >> 10 for k, _, _ in shard_rows(out))
    assert kept[HEAD - 1] < kept[-1]
    rows[kept[-1]]["output"] = "other " * 3  # past the first examples (checked at start-up): found when batched
    changed = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ConfigError, match=rf"other data: source '.*qa.jsonl', row {kept[-1]} has other tokens"):
        train(train_config(tiny_model_dir, changed, tmp_path / "a", **more, **{"distill.saved": str(out)}))
    assert records(tmp_path / "a")  # it trained the steps before that example
    rows = [dict(r) for r in QA_ROWS]
    rows[2]["output"] = "other " * 3  # among the first examples: refused at start-up, before a step
    with pytest.raises(ConfigError, match=r"other data: source '.*qa.jsonl', row 2 has other tokens"):
        train(train_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", rows), tmp_path / "a1", **more,
                           **{"distill.saved": str(out)}))
    assert not (tmp_path / "a1" / "metrics.jsonl").exists() or not records(tmp_path / "a1")
    skipped = sorted(set(range(24)) - {k >> 10 for k, _, _ in shard_rows(out)})  # too long when prepared
    rows = [dict(r) for r in QA_ROWS]
    rows[skipped[-1]] = {"instruction": "short", "output": "now"}  # kept now, and nothing was saved for it
    changed = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ConfigError, match=rf"holds no teacher rows for source '.*qa.jsonl', row {skipped[-1]}:"):
        train(train_config(tiny_model_dir, changed, tmp_path / "a2", **more, **{"distill.saved": str(out)}))
    with pytest.raises(ConfigError, match=r"holds the first 24 rows of source .* reads all its rows"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "b", **{**ONE, "data.limit": None},
                           **{"distill.saved": str(out)}))
    with pytest.raises(ConfigError, match="prepared from a stream"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "c", **{**ONE, "data.streaming": False},
                           **{"distill.saved": str(out)}))
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "done.json").unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "d", **ONE, **{"distill.saved": str(partial)}))


def test_a_mixture_source_without_rows_is_named(saved_mix, tiny_model_dir, qa_rows_file, text_dir, tmp_path):
    out, _ = saved_mix
    mix = mixture(qa_rows_file, text_dir)
    mix["data.sources"][0]["limit"] = 12  # still the same first examples: the qa rows serve it
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "a", **{**STREAM, "train.max_steps": 1}, **mix,
                       **{"distill.saved": str(out)}))
    mix["data.sources"][1]["path"] = str(text_dir / "train-00001.jsonl")  # another source's first examples
    with pytest.raises(ConfigError, match="none of its sources .* source 'stories'"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "b", **STREAM, **mix,
                           **{"distill.saved": str(out)}))


def test_check_is_of_ids_and_labels():
    ids, labels = [1, 2, 3], [-100, 2, 3]
    assert check_of(ids, labels) == check_of(torch.tensor(ids).numpy(), labels)
    assert check_of(ids, labels) != check_of(ids, [-100, -100, 3]) and row_key(1 << 20, 0, 0) is None


def test_a_stream_gives_each_key_the_tokens_of_its_first_pass(tmp_path, tiny_tokenizer):
    """The invariant the lookup rests on: whatever the pass, shuffle or mixture, an example with key
    (file, row, part) has the ids and labels the first pass in file order gave that key; a row with
    several examples (a template that is not prefix-stable) numbers them by part."""
    from sftune.config import load_config
    from sftune.data.mixture import resolve_sources
    from sftune.data.stream import Stream, first_pass

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = (  # marks the last assistant message: each turn renders differently once later turns follow
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<final>{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    conv = [{"messages": [{"role": "user", "content": f"q{i} " * (1 + i % 3)}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": f"b{i}"}]}
            for i in range(9)]
    d = tmp_path / "chats"
    d.mkdir()
    write_jsonl(d / "train-00000.jsonl", conv[:4])
    write_jsonl(d / "train-00001.jsonl", conv[4:])
    qa = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[:10])
    cfg = load_config(None, {"data.sources": [{"path": str(d)}, {"path": str(qa), "template": "qa"}]})

    def stream():
        return Stream(resolve_sources(cfg.data), tok, 64, seed=3, packing=True, pack_buffer=8, shuffle_buffer=4)

    first = [{(e.file, e.row, e.part): check_of(e.ids, e.labels) for exs, _ in first_pass(stream(), s) for e in exs}
             for s in (0, 1)]
    assert {k[2] for k in first[0]} == {0, 1} and {k[0] for k in first[0]} == {0, 1}
    s, seen = stream(), set()
    for _ in range(120):
        e = s.next_example()
        assert first[e.source][(e.file, e.row, e.part)] == check_of(e.ids, e.labels)
        seen.add((e.source, e.file, e.row, e.part))
    assert s.buffers[0].reader.cursor["pass"] >= 2 and len(seen) == len(first[0]) + len(first[1])


def test_prepare_refuses_examples_with_images(tmp_path, monkeypatch):
    """A streamed example carrying images cannot get a text teacher's rows: refused, naming it."""
    import numpy as np

    import sftune.distill.saved_stream as saved_stream
    from sftune.data.examples import StreamExample

    e = StreamExample(np.arange(4), np.arange(4), None, 0, 7, {"images": ["a.png"]}, 1, 0)
    monkeypatch.setattr(saved_stream, "saved_pass", lambda *a, **kw: iter([([e], {"in_pass": 8})]))
    monkeypatch.setattr(saved_stream, "file_names", lambda spec: ["a.jsonl", "b.jsonl"])
    stream = type("S", (), {"specs": [type("Spec", (), {"label": "pics"})()]})()
    with pytest.raises(ConfigError, match="source 'pics', row 7 of b.jsonl carries images"):
        saved_stream.write_source(stream, 0, tmp_path, 5, None)


def three_files(d: Path, names=("a", "b", "c")) -> Path:
    """A source of three files of 5 short qa rows each (every row kept)."""
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        write_jsonl(d / f"{name}.jsonl", [{"instruction": f"{name} q{i} " * (1 + i % 3), "output": f"{name} a{i} " * (
            1 + i % 2)} for i in range(5)])
    return d


FILES = {**STREAM, "data.limit": 4, "data.shuffle_buffer": 4, "data.pack_buffer": 4}


@pytest.fixture(scope="module")
def saved_files(tiny_model_dir, teacher_dir, tmp_path_factory):
    d = three_files(tmp_path_factory.mktemp("files") / "parts")
    over = {**FILES, "distill.teacher": str(teacher_dir)}
    return d, prepare_saved(tmp_path_factory, "saved_files", tiny_model_dir, d, over)[0]


def test_a_limit_with_several_files_saves_every_row_a_pass_can_read(tmp_path, tiny_tokenizer):
    """Pass 0 reads the first ``limit`` rows in file order; later passes order the files anew, so they
    read other files' first rows: prepare saves each file's first ``limit`` rows (keys in order), and
    every example of any pass (any seed) finds its key with its first tokens. A resumed prepare
    (cursor mid-file or at a file's limit) reads the same rows on."""
    from sftune.config import load_config
    from sftune.data.mixture import resolve_sources
    from sftune.data.stream import Stream, first_pass
    from sftune.distill.saved_stream import saved_pass

    cfg = load_config(None, {"data.path": str(three_files(tmp_path / "parts")), "data.template": "qa",
                             "data.limit": 4, "data.streaming": True})

    def stream(seed=0):
        return Stream(resolve_sources(cfg.data), tiny_tokenizer, 64, seed=seed, packing=False, pack_buffer=4,
                      shuffle_buffer=4)

    full = list(saved_pass(stream(), 0))
    saved = {(e.file, e.row, e.part): check_of(e.ids, e.labels) for exs, _ in full for e in exs}
    assert list(saved) == [(f, r, 0) for f in range(3) for r in range(4)] and full[-1][1]["in_pass"] == 12
    keys = [row_key(*k) for k in saved]
    assert keys == sorted(keys)
    pass0 = {(e.file, e.row, e.part) for exs, _ in first_pass(stream(), 0) for e in exs}
    assert pass0 == {(0, r, 0) for r in range(4)}  # the first 4 rows of the concatenation: file a's
    for at in (3, 5):  # resumed at file a's limit (on to file b) and inside file b
        assert [[(e.file, e.row) for e in exs] for exs, _ in saved_pass(stream(), 0, full[at][1])] == [
            [(e.file, e.row) for e in exs] for exs, _ in full[at + 1:]]
    seen = set()
    for seed in (0, 1, 2):
        s = stream(seed)
        for _ in range(40):
            e = s.next_example()
            assert saved[(e.file, e.row, e.part)] == check_of(e.ids, e.labels)
            seen.add((e.file, e.row, e.part))
        assert s.buffers[0].reader.cursor["pass"] >= 5
    assert seen - pass0 and {f for f, _, _ in seen} == {0, 1, 2}  # later passes read rows pass 0 never reads


def test_saved_equals_live_with_a_limit_and_several_files(saved_files, tiny_model_dir, teacher_dir, tmp_path):
    d, out = saved_files
    assert json.loads((out / "done.json").read_text())["rows"] == 12
    assert json.loads((out / "manifest.json").read_text())["files"] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    over = {**FILES, "train.max_steps": 4, "train.seed": 5}
    train(train_config(tiny_model_dir, d, tmp_path / "live", **over, **{"distill.teacher": str(teacher_dir)}))
    train(train_config(tiny_model_dir, d, tmp_path / "saved", **over, **{"distill.saved": str(out)}))
    a, b = records(tmp_path / "live"), records(tmp_path / "saved")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    report = json.loads((tmp_path / "saved" / "data_report.json").read_text())
    assert max(s["passes"] for s in report["sources"]) > 2


def test_a_source_whose_files_changed_is_refused_at_start_up(saved_files, tiny_model_dir, tmp_path):
    """One source has no fingerprint: its file list is compared, naming what was added or is missing."""
    d, out = saved_files
    more = shutil.copytree(d, tmp_path / "more")
    three_files(more, names=("ab",))  # sorts between a and b: b's and c's keys would shift
    with pytest.raises(ConfigError, match=r"other files of source .*\(added: ab.jsonl;"):
        train(train_config(tiny_model_dir, more, tmp_path / "a", **FILES, **{"distill.saved": str(out)}))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    fewer = shutil.copytree(d, tmp_path / "fewer")
    (fewer / "c.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"other files of source .*\(missing: c.jsonl;"):
        train(train_config(tiny_model_dir, fewer, tmp_path / "b", **FILES, **{"distill.saved": str(out)}))
    with pytest.raises(ConfigError, match=r"holds the first 4 rows of each file of source .* reads all its rows"):
        train(train_config(tiny_model_dir, d, tmp_path / "c", **{**FILES, "data.limit": None},
                           **{"distill.saved": str(out)}))
