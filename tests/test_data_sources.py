"""Sources, the pipeline end to end, caching, and clear errors for bad input."""

import json

import pytest

from sftune.config import DataConfig
from sftune.data.one_source import prepare_data
from sftune.data.sources import load_source
from sftune.errors import ConfigError, DataError

from conftest import write_jsonl

QA = [{"instruction": f"question {i}?", "output": f"answer {i}", "input": ""} for i in range(40)]


@pytest.fixture
def qa_file(tmp_path):
    return write_jsonl(tmp_path / "qa.jsonl", QA)


def test_local_formats(tmp_path):
    import pandas as pd

    df = pd.DataFrame(QA)
    (tmp_path / "j.json").write_text(json.dumps(QA))
    write_jsonl(tmp_path / "l.jsonl", QA)
    df.to_csv(tmp_path / "c.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    for name in ("j.json", "l.jsonl", "c.csv", "p.parquet"):
        src = load_source(DataConfig(path=str(tmp_path / name)))
        assert len(src.train) == 40 and "instruction" in src.train.column_names


def test_directory_with_splits(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", QA[:30])
    write_jsonl(d / "test.jsonl", QA[30:])
    src = load_source(DataConfig(path=str(d), eval_split="test"))
    assert len(src.train) == 30 and len(src.eval) == 10


def test_limit_shuffle_eval_fraction(qa_file):
    src = load_source(DataConfig(path=str(qa_file), limit=10))
    assert src.train["instruction"] == [f"question {i}?" for i in range(10)]  # the first N rows
    src = load_source(DataConfig(path=str(qa_file), eval_split=0.25, limit=5))
    assert len(src.train) == 5 and len(src.eval) == 10
    assert set(src.train["__row__"]).isdisjoint(src.eval["__row__"])
    shuffled = load_source(DataConfig(path=str(qa_file), shuffle=True, seed=1, limit=10))
    assert shuffled.train["instruction"] != src.train["instruction"][:10]
    again = load_source(DataConfig(path=str(qa_file), shuffle=True, seed=1, limit=10))
    assert again.train["instruction"] == shuffled.train["instruction"]


def test_remove_columns(qa_file):
    src = load_source(DataConfig(path=str(qa_file), remove_columns=["input"]))
    assert "input" not in src.train.column_names
    with pytest.raises(DataError, match="did you mean 'input'"):
        load_source(DataConfig(path=str(qa_file), remove_columns=["inptu"]))


def test_pipeline_end_to_end(tiny_tokenizer, qa_file):
    data = prepare_data(DataConfig(path=str(qa_file), template="qa", eval_split=0.1), tiny_tokenizer, 128)
    assert len(data.train) == 36 and len(data.eval) == 4
    rep = data.report
    assert rep.kept == 36 and rep.skipped == {} and rep.truncated == 0 and rep.eos_not_trained == 0
    assert 0 < rep.loss_fraction < 1


def test_rerun_hits_the_cache(tiny_tokenizer, qa_file, monkeypatch):
    from sftune.data import tokenize

    cfg = DataConfig(path=str(qa_file), template="qa")
    prepare_data(cfg, tiny_tokenizer, 128)
    calls = []
    original = tokenize.Tokenizer.examples  # what both the map (Arrow) and the dict-of-lists call run
    monkeypatch.setattr(tokenize.Tokenizer, "examples", lambda self, b: calls.append(1) or original(self, b))
    prepare_data(cfg, tiny_tokenizer, 128)
    assert calls == []  # loaded from the datasets cache
    prepare_data(cfg.model_copy(update={"template": "alpaca"}), tiny_tokenizer, 128)
    assert calls  # a changed config re-tokenizes


def test_skips_and_truncations_are_counted(tiny_tokenizer, tmp_path):
    rows = QA[:5] + [{"instruction": "q", "output": "", "input": ""}, {"instruction": "q", "output": None, "input": ""},
                     {"instruction": "long " * 200, "output": "x", "input": ""},
                     {"instruction": "q", "output": "very long answer " * 50, "input": ""}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(DataConfig(path=str(f), template="qa"), tiny_tokenizer, 64)
    rep = data.report
    assert rep.kept == 6
    assert rep.skipped == {"empty or null completion": 2, "prompt longer than max_length": 1}
    assert rep.skipped_rows["empty or null completion"] == [5, 6]
    assert rep.truncated == 1 and rep.truncated_rows == [8]


# ----------------------------------------------------------------------------- bad input


def test_missing_column_names_file_and_closest(tiny_tokenizer, qa_file):
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(qa_file), prompt="{instruction}", completion="{outptu}"), tiny_tokenizer, 64)
    msg = str(e.value)
    assert str(qa_file) in msg and "'outptu'" in msg and "did you mean 'output'" in msg


def test_text_column_missing(tiny_tokenizer, qa_file):
    with pytest.raises(DataError, match="text_column"):
        prepare_data(DataConfig(path=str(qa_file), format="text"), tiny_tokenizer, 64)


def test_malformed_json_line(tiny_tokenizer, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(f)), tiny_tokenizer, 64)
    assert "line 3" in str(e.value) and str(f) in str(e.value)


def test_non_string_field_names_row_and_column(tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(f), template="qa"), tiny_tokenizer, 64)
    assert "row 1" in str(e.value) and "'output'" in str(e.value) and str(f) in str(e.value)
    data = prepare_data(DataConfig(path=str(f), template="qa", on_bad_row="skip"), tiny_tokenizer, 64)
    assert data.report.kept == 1 and sum(data.report.skipped.values()) == 1


def test_unbalanced_template_is_config_error(tiny_tokenizer, qa_file):
    with pytest.raises(ConfigError, match="unbalanced braces"):
        prepare_data(DataConfig(path=str(qa_file), prompt="### Q: {instruction", completion="{output}"),
                     tiny_tokenizer, 64)


def test_messages_without_assistant(tiny_tokenizer, tmp_path):
    from sftune.data.templates import SIMPLE_CHAT

    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = SIMPLE_CHAT
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(f)), tok, 64)
    assert "row 1" in str(e.value) and "no assistant turn" in str(e.value)


def test_all_skipped_is_an_error(tiny_tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match="every training example was skipped"):
        prepare_data(DataConfig(path=str(f), template="qa"), tiny_tokenizer, 64)


def test_missing_file(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(DataConfig(path=str(tmp_path / "nope.jsonl")))


def test_unknown_split(qa_file):
    with pytest.raises(DataError, match="no split 'validation'"):
        load_source(DataConfig(path=str(qa_file), eval_split="validation"))


# ----------------------------------------------------------------------------- hostile files (issue 12)


BAD_FILES = {
    # name: (bytes, what the message must name)
    "extra_field.csv": (b"text,label\nhello,1,oops\nworld,0,oops\n",
                        ["line 2 has 3 fields but the header has 2", "text, label"]),
    "extra_later.csv": (b"text,label\nhello,1\nworld,0,oops\n", ["line 3 has 3 fields but the header has 2"]),
    "unterminated.csv": (b'text,label\n"hello,1\nworld,0\n', ["ParserError", "EOF inside string"]),
    "empty.csv": (b"", ["the file is empty"]),
    "blank.jsonl": (b"\n\n  \n", ["the file is empty"]),
    "header_only.csv": (b"text,label\n", ["a header (text, label) but no data rows"]),
    "latin1.csv": (b"text\ncaf\xe9 au lait\n", ["not valid utf-8: byte 8 (line 2)", "data.encoding"]),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["not valid utf-8: byte 28 (line 2)", "data.encoding"]),
    "row_column.jsonl": (b'{"text": "a", "__row__": 7}\n', ["'__row__' is reserved", "data.remove_columns"]),
    "numbers.json": (b"[1, 2]", ["row 0, column 'text': expected a string"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_hostile_files_are_clear_errors(name, tiny_model_dir, tmp_path, capsys):
    """Each reaches the user as one clear error naming the file (exit 2, no traceback)."""
    from sftune.cli import main

    content, says = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    code = main(["preview", "imdb", f"model.path={tiny_model_dir}", f"data.path={path}", "data.eval_split=null"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(path) in err
    for text in says:
        assert text in err, err


def test_encoding_key_reads_other_encodings(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"text\ncaf\xe9\n")
    (tmp_path / "l.jsonl").write_bytes(b'{"text": "na\xefve"}\n')
    assert load_source(DataConfig(path=str(tmp_path / "l.csv"), encoding="latin-1")).train["text"] == ["café"]
    assert load_source(DataConfig(path=str(tmp_path / "l.jsonl"), encoding="latin-1")).train["text"] == ["naïve"]
    with pytest.raises(DataError, match="data.encoding='klingon' is not a known text encoding"):
        load_source(DataConfig(path=str(tmp_path / "l.csv"), encoding="klingon"))


def test_directory_maps_exact_split_names_and_prints_it(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", QA[:10])
    write_jsonl(d / "testimonials.jsonl", QA[10:20])  # not a split name: training data
    write_jsonl(d / "test.jsonl", QA[20:25])
    write_jsonl(d / "validation-00000-of-00001.jsonl", QA[25:28])  # a numbered shard of a split
    src = load_source(DataConfig(path=str(d), eval_split="validation"))
    assert len(src.train) == 20 and len(src.eval) == 3
    err = capsys.readouterr().err
    assert "train ← testimonials.jsonl, train.jsonl" in err and "test ← test.jsonl" in err
    assert "validation ← validation-00000-of-00001.jsonl" in err


def test_json_list_of_strings_is_a_text_column(tmp_path):
    f = tmp_path / "strings.json"
    f.write_text(json.dumps(["first text", "second text"]))
    src = load_source(DataConfig(path=str(f)))
    assert src.train["text"] == ["first text", "second text"]
    from sftune.data.sources import read_json_rows

    with pytest.raises(DataError, match="row 0 is a JSON str, expected an object"):
        read_json_rows(str(f))


QA_BAD = {
    # name: (files, what the message must name)
    "strings.json": ({"strings.json": b'["first text", "second text"]'},
                     ["JSON list of plain strings, not of rows", "column 'instruction'", '[{"instruction": "..."']),
    "shards": ({"shards/part-0.jsonl": b'{"instruction": "a", "output": "b"}\n',
                "shards/part-1.jsonl": b'{"question": "a", "answer": "b"}\n'},
               ["the train shards have different columns", "part-0.jsonl has instruction, output",
                "part-1.jsonl has answer, question"]),
    "surrogate.jsonl": ({"surrogate.jsonl": b'{"instruction": "a", "output": "b"}\n'
                                            b'{"instruction": "x \\ud800 y", "output": "b"}\n'},
                        ["line 2 holds a lone UTF-16 surrogate escape", "'instruction'"]),
}


@pytest.mark.parametrize("name", sorted(QA_BAD))
def test_unclear_reader_errors_name_file_and_fix(name, tiny_model_dir, tmp_path, capsys):
    """A JSON list of strings for a Q/A recipe, shards whose columns differ, a lone surrogate escape:
    one clear error each (exit 2, no traceback) naming the file and what to do."""
    from sftune.cli import main

    files, says = QA_BAD[name]
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    path = tmp_path / name
    code = main(["preview", "codealpaca", f"model.path={tiny_model_dir}", f"data.path={path}", "data.limit=null"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(path) in err
    for text in says:
        assert text in err, err
