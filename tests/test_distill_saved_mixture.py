"""The saved path with a data.sources mixture: sftune distill-prepare writes each source's rows on their
own; training from them equals the live teacher on the same mixture (any weights, seed or pass), a
saved directory made for other sources is refused, and a resumed run is bit-exact."""

from __future__ import annotations

import json
import shutil

import pytest

from sftune.cli import main
from sftune.errors import ConfigError
from sftune.training import train

from conftest import build_model_dir, train_config, write_jsonl
from distill_helpers import prepare_saved, records, resumed_at_step_2

pytestmark = pytest.mark.usefixtures("no_plots")

BASE = {"data.max_length": 64, "train.max_steps": 3, "train.batch_size": 4, "data.template": None}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """12 plain-text rows, one bad (skipped): the small source, drawn in several passes."""
    rows = [{"text": f"story {i} " * (2 + i % 7)} for i in range(13)]
    rows[4]["text"] = None
    return write_jsonl(tmp_path_factory.mktemp("text") / "text.jsonl", rows)


def sources(qa, text, w_qa=1.0, w_text=1.0, qa_limit=16):
    return {"data.sources": [{"path": str(qa), "template": "qa", "weight": w_qa, "label": "qa", "limit": qa_limit},
                             {"path": str(text), "format": "text", "weight": w_text, "on_bad_row": "skip"}]}


@pytest.fixture(scope="module")
def saved_mix(tiny_model_dir, teacher_dir, qa_rows_file, text_file, tmp_path_factory):
    """distill-prepare on a two-source recipe: the teacher's top 400 (= the vocabulary), 5 per shard."""
    return prepare_saved(tmp_path_factory, "saved_mix", tiny_model_dir, qa_rows_file,
                         {**BASE, **sources(qa_rows_file, text_file), "distill.teacher": str(teacher_dir)})


def test_prepare_writes_each_source_and_resumes(saved_mix):
    out, args = saved_mix
    manifest = json.loads((out / "manifest.json").read_text())
    qa, text = manifest["sources"]
    assert (qa["label"], qa["examples"], text["examples"]) == ("qa", 12, 12)  # 4 qa rows are too long
    assert qa["dir"] == "sources/00-qa" and text["dir"] == "sources/01-text.jsonl"
    for entry in (qa, text):  # each source's directory is a one-source saved directory
        one = json.loads((out / entry["dir"] / "manifest.json").read_text())
        assert one["fingerprint"] == entry["fingerprint"] and one["examples"] == entry["examples"]
        assert len(list((out / entry["dir"] / "shards").iterdir())) == -(-entry["examples"] // 5)
    last = sorted((out / text["dir"] / "shards").iterdir())[-1]
    shutil.rmtree(last)
    before = {p: p.stat().st_mtime_ns for e in (qa, text) for p in (out / e["dir"] / "shards").iterdir()}
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()) and last.exists()  # only the missing shard


@pytest.mark.parametrize("mix", [
    {"distill.loss": "jsd", "distill.beta": 0.5, "distill.alpha": 0.7},
    {"w_text": 3.0, "train.seed": 7, "distill.top_k": 12, "distill.top_k_tail": "bucket"},
    {"w_qa": 3.0, "train.epochs": 2, "train.max_steps": None, "data.packing": False, "distill.top_k": 12}], ids=str)
def test_saved_equals_live_in_a_mixture(mix, saved_mix, tiny_model_dir, teacher_dir, qa_rows_file, text_file,
                                        tmp_path):
    """The same saved directory serves any weights, seed, passes or packing of the mixture: each drawn
    example carries its own source's rows, so every step's loss equals the live teacher's."""
    out, _ = saved_mix
    weights = {k: v for k, v in mix.items() if k.startswith("w_")}
    over = {**BASE, **sources(qa_rows_file, text_file, **weights), **{k: v for k, v in mix.items() if k not in weights}}
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "live", **over,
                       **{"distill.teacher": str(teacher_dir)}))
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "saved", **over, **{"distill.saved": str(out)}))
    a, b = records(tmp_path / "live"), records(tmp_path / "saved")
    assert sorted(a) == sorted(b) and len(a) >= 3
    for step in a:
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert b[1]["distill"]["how"] == "saved"
    if over.get("train.epochs") == 2:  # the qa source was drawn again, with the same rows
        report = json.loads((tmp_path / "saved" / "data_report.json").read_text())
        assert report["sources"][0]["passes"] > 1


def test_refusals(saved_mix, tiny_model_dir, qa_rows_file, text_file, tmp_path):
    out, _ = saved_mix
    changed = sources(qa_rows_file, text_file, qa_limit=12)  # the qa source's examples differ
    with pytest.raises(ConfigError, match="other data: none of its sources .* source 'qa'"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "a", **BASE, **changed,
                           **{"distill.saved": str(out)}))
    one = {**BASE, "data.template": "qa", "data.limit": 16, "train.max_steps": 1}  # the mixture's qa rows serve it
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "b", **one, **{"distill.saved": str(out)}))
    with pytest.raises(ConfigError, match="other data"):  # a source the mixture does not have
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "c", **{**BASE, "data.template": "qa"},
                           **{"data.limit": 10, "distill.saved": str(out)}))
    with pytest.raises(ConfigError, match="data.streaming"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "d", **BASE, **sources(qa_rows_file, text_file),
                           **{"distill.saved": str(out), "data.streaming": True}))
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    text_dir = json.loads((out / "manifest.json").read_text())["sources"][1]["dir"]
    shutil.rmtree(next((partial / text_dir / "shards").iterdir()))
    with pytest.raises(ConfigError, match="incomplete"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "e", **BASE, **sources(qa_rows_file, text_file),
                           **{"distill.saved": str(partial)}))


def test_a_one_source_directory_is_refused_for_a_mixture(saved_mix, tiny_model_dir, qa_rows_file, text_file, tmp_path):
    """A mixture source without saved rows is named (here: a one-source directory, the qa source's)."""
    out, _ = saved_mix
    qa_dir = out / json.loads((out / "manifest.json").read_text())["sources"][0]["dir"]
    with pytest.raises(ConfigError, match="other data: .* source '.*text.jsonl'"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "a", **BASE, **sources(qa_rows_file, text_file),
                           **{"distill.saved": str(qa_dir)}))


def test_resume_is_bit_exact(saved_mix, dropout_model_dir, qa_rows_file, text_file, tmp_path):
    out, _ = saved_mix
    over = {**BASE, **sources(qa_rows_file, text_file, w_text=2.0), "train.max_steps": 4, "train.save_every": 2,
            "train.keep_checkpoints": 5, "distill.saved": str(out), "distill.alpha": 0.5, "distill.top_k": 20}
    full, resumed = resumed_at_step_2(
        lambda out, **more: train_config(dropout_model_dir, qa_rows_file, out, **over, **more), tmp_path)
    for step in (3, 4):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_teacher_columns_in_a_mixture(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """distill.saved=columns over two sources of Axolotl KD rows trains as the live teacher does; a
    source without the columns is named."""
    from test_distill_saved import axolotl_rows

    rows = axolotl_rows(teacher_dir, 16)
    a, b = write_jsonl(tmp_path / "a.jsonl", rows[:3]), write_jsonl(tmp_path / "b.jsonl", rows[3:])
    mix = {"data.sources": [{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}], "data.template": None,
           "data.max_length": 64, "train.max_steps": 3, "train.batch_size": 3, "distill.top_k": 16}
    got = {}
    for how, extra in (("live", {"distill.teacher": str(teacher_dir)}), ("columns", {"distill.saved": "columns"})):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / how, **mix, **extra))
        got[how] = records(tmp_path / how)
    for step in (1, 2, 3):
        for key in ("loss", "distill_loss", "ce_loss"):
            assert got["columns"][step][key] == pytest.approx(got["live"][step][key], rel=1e-5, abs=1e-7), (step, key)
    plain = {"path": str(qa_rows_file), "template": "qa", "label": "plain qa"}
    with pytest.raises(ConfigError, match="no teacher columns \\(source 'plain qa'\\)"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "bad", **{
            **mix, "data.sources": [*mix["data.sources"], plain], "distill.saved": "columns"}))
