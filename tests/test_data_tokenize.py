"""Masking by construction: the trained tokens, decoded, are exactly the completion plus EOS."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftune.config import DataConfig
from sftune.data.formats import MessagesFormat, PromptCompletionFormat, TextFormat
from sftune.data.templates import CHATML
from sftune.data.tokenize import IGNORE, Example, RowTokenizer, special_prefix, truncate
from sftune.errors import RowSkip

from conftest import shared_file


def run(fmt, tok, rows, max_length=256, on_bad_row="error"):
    fn = RowTokenizer(fmt, tok, max_length, on_bad_row=on_bad_row, source="test")
    cols = {k: [r.get(k) for r in rows] for k in rows[0]}
    return fn(cols)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def check_mask_property(tok, fmt, rows, max_length=100_000):
    """For every kept, untruncated example: decode(labelled ids) == completion + EOS, and the
    prompt ids equal the prompt tokenized alone (what the model sees at inference)."""
    out = run(fmt, tok, rows, max_length)
    checked = 0
    for row, ids, labels, skip, trunc in zip(rows, out["input_ids"], out["labels"], out["skip"], out["truncated"]):
        if skip:
            continue
        ex = fmt(row)
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        assert [lab for lab in labels if lab != IGNORE] == trained  # labels are the ids themselves
        assert not trunc
        assert decode(tok, trained) == ex.trained_text + tok.eos_token
        if not fmt.train_on_prompt:
            prompt_ids = special_prefix(tok) + tok(ex.meta["prompt"], add_special_tokens=False)["input_ids"]
            assert ids[:len(prompt_ids)] == prompt_ids
            assert all(lab == IGNORE for lab in labels[:len(prompt_ids)])
        checked += 1
    return checked


def test_prompt_completion_labels(tiny_tokenizer):
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    rows = [{"instruction": "What is 2+2?", "output": "4"}, {"instruction": "Say hi", "output": "Hello world!"}]
    assert check_mask_property(tiny_tokenizer, fmt, rows) == 2


def test_eos_is_learned_even_when_pad_is_eos(tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token  # the classic setting that used to mask EOS
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    out = run(fmt, tiny_tokenizer, [{"instruction": "q", "output": "a"}])
    assert out["labels"][0][-1] == tiny_tokenizer.eos_token_id
    assert out["eos_trained"] == [True]


def test_text_format_trains_all_and_eos(tiny_tokenizer):
    out = run(TextFormat(DataConfig()), tiny_tokenizer, [{"text": "I loved this movie."}])
    assert out["labels"][0] == out["input_ids"][0]
    assert out["input_ids"][0][-1] == tiny_tokenizer.eos_token_id


def test_truncation_cuts_only_the_completion_tail(tiny_tokenizer):
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    row = {"instruction": "Sort the list.", "output": "The quick brown fox jumps over the lazy dog. " * 5}
    full = run(fmt, tiny_tokenizer, [row], max_length=10_000)
    n = len(full["input_ids"][0])
    out = run(fmt, tiny_tokenizer, [row], max_length=n - 7)
    assert out["truncated"] == [True] and out["skip"] == [""]
    assert out["input_ids"][0] == full["input_ids"][0][: n - 7]
    assert out["eos_trained"] == [False]  # the end was cut, so there is no EOS to learn


def test_prompt_that_does_not_fit_is_skipped(tiny_tokenizer):
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    out = run(fmt, tiny_tokenizer, [{"instruction": "word " * 50, "output": "x"}], max_length=20)
    assert out["skip"] == ["prompt longer than max_length"]


def test_truncate_skips_without_trained_tokens():
    with pytest.raises(RowSkip):
        truncate(Example([1, 2], [IGNORE, IGNORE], [0.0, 0.0]), max_length=10)


def test_bad_rows_skip_or_error(tiny_tokenizer):
    from sftune.errors import DataError

    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    rows = [{"instruction": "ok", "output": "fine", "__row__": 0}, {"instruction": 7, "output": "x", "__row__": 1}]
    out = run(fmt, tiny_tokenizer, rows, on_bad_row="skip")
    assert out["skip"][0] == "" and out["skip"][1].startswith("bad row")
    with pytest.raises(DataError) as e:
        run(fmt, tiny_tokenizer, rows, on_bad_row="error")
    assert "row 1" in str(e.value) and "'instruction'" in str(e.value) and "on_bad_row=skip" in str(e.value)


def test_chat_labels_are_assistant_turns(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    fmt = MessagesFormat(DataConfig(), tok, "messages")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]
    out = run(fmt, tok, [{"messages": conv}])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert decode(tok, ids) == tok.apply_chat_template(conv, tokenize=False)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert decode(tok, trained) == "Hello there<|im_end|>Bye!<|im_end|>"
    assert out["eos_trained"] == [True]


# ----------------------------------------------------------------------------- property tests

texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=texts, completion=texts.filter(lambda s: s.strip()))
def test_mask_property_arbitrary_unicode(tiny_tokenizer, prompt, completion):
    fmt = PromptCompletionFormat(DataConfig(prompt="{p}", completion="{c}"))
    assert check_mask_property(tiny_tokenizer, fmt, [{"p": prompt, "c": completion}]) == 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=texts, completion=texts.filter(lambda s: s.strip()))
def test_mask_property_arbitrary_unicode_gpt2(gpt2_tokenizer, prompt, completion):
    fmt = PromptCompletionFormat(DataConfig(prompt="### Question: {p}\n ### Answer:", completion=" {c}"))
    assert check_mask_property(gpt2_tokenizer, fmt, [{"p": prompt, "c": completion}]) == 1


# ----------------------------------------------------------------------------- real data, real tokenizer


def _json_rows(name):
    import json

    return json.loads(shared_file(name).read_text())


@pytest.mark.shared
@pytest.mark.parametrize("name,template", [("codealpaca_2k.json", "qa"), ("codealpaca_2k.json", "alpaca"),
                                           ("alpaca_5000.json", "alpaca"), ("alpaca_5000.json", "qa")])
def test_mask_property_every_row_real_data(gpt2_tokenizer, name, template):
    rows = _json_rows(name)
    fmt = PromptCompletionFormat(DataConfig(template=template))
    checked = check_mask_property(gpt2_tokenizer, fmt, rows)
    skipped = run(fmt, gpt2_tokenizer, rows, 100_000)["skip"]
    assert checked + sum(1 for s in skipped if s) == len(rows)
    assert checked >= len(rows) - 10  # only empty outputs may be skipped


# ----------------------------------------------------------------------------- the fast path == the per-row path

VARIED = [
    {"instruction": "Say hi", "input": "", "output": "Hello world!"},
    {"instruction": "Sort", "input": "[3, 1, 2]", "output": "\n[1, 2, 3]"},  # "\n" + "\n": a straddling token
    {"instruction": "Poem", "input": "", "output": "\n\nRoses\n\nare red  "},
    {"instruction": "Emoji", "input": "🙂 héllo 日本語", "output": " 🙂 wörld"},
    {"instruction": "Empty", "input": "", "output": ""},  # a counted skip
    {"instruction": 7, "input": "", "output": "x"},  # a bad row, skipped
    {"instruction": "Long " * 40, "input": "", "output": "word " * 60},  # truncated, or its prompt does not fit
    {"instruction": "Spaces", "input": "  ", "output": "   lead and trail   "},
    {"instruction": "Specials </s> <s> inside", "input": "", "output": "end </s> here"},
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
     {"role": "user", "content": "Bye\n"}, {"role": "assistant", "content": "\nBye!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


def per_row(fmt, tok, rows, max_length):
    """The reference: one row at a time, every tokenization through the transformers call."""
    from sftune.data.tokenize import SequenceEncoder

    fn = RowTokenizer(fmt, tok, max_length, on_bad_row="skip", source="test")
    fn.encoder = SequenceEncoder(tok, add_bos=fmt.add_bos, fast=False)
    out = {}
    for i, row in enumerate(rows):
        for k, v in fn({**{k: [v] for k, v in row.items()}, "__row__": [i]}).items():
            out.setdefault(k, []).extend(v)
    return out


def check_fast_equals_per_row(fmt, tok, rows, max_length):
    import numpy as np

    fn = RowTokenizer(fmt, tok, max_length, on_bad_row="skip", source="test")
    assert fn.encoder.backend is not None  # the fast path is the one under test
    batch = {**{k: [r.get(k) for r in rows] for k in rows[0]}, "__row__": list(range(len(rows)))}
    want = per_row(fmt, tok, rows, max_length)
    for got in (fn(batch), fn.table(batch).to_pydict()):
        assert set(got) == set(want)
        for k in want:
            if k == "weights":  # stored as float32
                assert [np.float32(w).tolist() for w in got[k]] == [np.float32(w).tolist() for w in want[k]]
            else:
                assert got[k] == want[k], k
    return want


@pytest.mark.parametrize("style", ["tiny", "gpt2", "bytelevel", "metaspace", "metaspace_never"])
@pytest.mark.parametrize("template,max_length", [("alpaca", 4096), ("qa", 4096), ("alpaca", 60)])
def test_fast_path_equals_per_row_path(style, template, max_length, request):
    from test_data_chat_templates import build

    tok = {"tiny": lambda: request.getfixturevalue("tiny_tokenizer"),
           "gpt2": lambda: request.getfixturevalue("gpt2_tokenizer")}.get(style, lambda: build(style))()
    fmt = PromptCompletionFormat(DataConfig(template=template))
    want = check_fast_equals_per_row(fmt, tok, VARIED, max_length)
    assert sum(1 for s in want["skip"] if s) >= 2 and len(want["row"]) >= len(VARIED)
    if max_length == 60:
        assert any(want["truncated"]) or any("max_length" in s for s in want["skip"])


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_fast_path_equals_per_row_path_chat_and_text(style):
    from test_data_chat_templates import CHATML as CHAT, build

    tok = build(style)
    tok.chat_template = CHAT
    want = check_fast_equals_per_row(MessagesFormat(DataConfig(), tok, "messages"), tok,
                                     [{"messages": c} for c in CONVERSATIONS], 4096)
    assert len(want["row"]) >= len(CONVERSATIONS)
    fmt = TextFormat(DataConfig(response_template="### Answer:"))
    rows = [{"text": "### Question: a\n### Answer:\nb"}, {"text": "no template"}, {"text": "x ### Answer: y z"}]
    check_fast_equals_per_row(fmt, tok, rows, 4096)


def test_straddling_token_is_counted_by_both_paths():
    from test_data_chat_templates import build

    tok = build("bytelevel")  # "\n\n" is one token: a prompt ending "\n" and a reply starting "\n" straddle
    fmt = PromptCompletionFormat(DataConfig(prompt="Q: {q}\n", completion="{a}"))
    want = check_fast_equals_per_row(fmt, tok, [{"q": "x", "a": "\nyes"}, {"q": "y", "a": "no"}], 4096)
    assert want["straddled"] == [True, False]


def test_fast_backend_ignores_the_tokenizers_truncation(gpt2_tokenizer):
    from sftune.data.tokenize import SequenceEncoder, plain_backend

    tok = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path)
    tok.backend_tokenizer.enable_truncation(3)  # a setting left on the Rust tokenizer
    assert plain_backend(tok) is not None
    text = "one two three four five six"
    fast = SequenceEncoder(tok, add_bos=False)
    assert fast.batch([text])[0][0] == fast.ids([text])[0] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(fast.ids([text])[0]) == 6


def test_row_tokenizer_keeps_its_earlier_name():
    """The row mapper is RowTokenizer (it maps rows; it is not a tokenizer); code written against the
    earlier name still runs."""
    from sftune.data import tokenize

    assert tokenize.Tokenizer is tokenize.RowTokenizer
