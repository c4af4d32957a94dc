"""Formats and templates: rows -> (text, trained) segments."""

import pytest

from sftune.config import DataConfig
from sftune.data.formats import BadRow, MessagesFormat, PromptCompletionFormat, TextFormat, choose_format
from sftune.data.templates import CHATML, NAMED_TEMPLATES, parse_fields
from sftune.errors import ConfigError, DataError, RowSkip


def test_parse_fields_and_literal_braces():
    assert parse_fields("### Q: {instruction}\n{{literal}} {input}") == ["instruction", "input"]


@pytest.mark.parametrize("bad", ["### {instruction", "oops }", "{a.b}", "{0}", "{x!r}", "{x:>10}", "{}"])
def test_malformed_templates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_fields(bad)


def test_qa_template_matches_tutorial():
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    ex = fmt({"instruction": "Add 1+1", "output": "2"})
    assert ex.text == "### Question: Add 1+1\n ### Answer: 2"
    assert ex.segments == [("### Question: Add 1+1\n ### Answer:", False), (" 2", True)]
    assert ex.add_eos


def test_alpaca_both_variants():
    fmt = PromptCompletionFormat(DataConfig(template="alpaca"))
    with_input = fmt({"instruction": "Translate", "input": "chat", "output": "cat"})
    without = fmt({"instruction": "Say hi", "input": "", "output": "hi"})
    assert "paired with an input" in with_input.text and "### Input:\nchat" in with_input.text
    assert "paired with an input" not in without.text and "### Input" not in without.text
    assert without.trained_text == "hi"
    assert fmt.columns == ["instruction", "output"]  # input is optional


def test_alpaca_h4_over_prompt_completion_columns():
    fmt = PromptCompletionFormat(DataConfig(template="alpaca_h4"))
    ex = fmt({"prompt": "Name a color", "completion": "Blue"})
    assert ex.text.startswith("Below is an instruction")
    assert ex.text.endswith("### Instruction:\nName a color\n\n### Response:\nBlue")


def test_train_on_prompt_trains_everything():
    fmt = PromptCompletionFormat(DataConfig(template="alpaca_h4", train_on_prompt=True))
    ex = fmt({"prompt": "p", "completion": "c"})
    assert all(trained for _, trained in ex.segments)


def test_columns_or_templates():
    fmt = PromptCompletionFormat(DataConfig(prompt="question", completion="answer"))
    assert fmt({"question": "q?", "answer": "a"}).segments == [("q?", False), ("a", True)]
    fmt = PromptCompletionFormat(DataConfig(prompt="Q: {question}\nA:", completion=" {answer}"))
    assert fmt({"question": "q?", "answer": "a"}).text == "Q: q?\nA: a"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_empty_completion_is_counted_skip(value):
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    with pytest.raises(RowSkip, match="empty or null completion"):
        fmt({"instruction": "x", "output": value})


def test_non_string_field_is_bad_row():
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    with pytest.raises(BadRow) as e:
        fmt({"instruction": 42, "output": "y"})
    assert e.value.column == "instruction" and "int" in e.value.message


def test_text_format():
    fmt = TextFormat(DataConfig())
    assert fmt({"text": "hello"}).segments == [("hello", True)]
    with pytest.raises(RowSkip):
        fmt({"text": ""})


def test_auto_format_detection(tiny_tokenizer):
    assert choose_format(DataConfig(), ["text", "label"], tiny_tokenizer).name == "text"
    assert choose_format(DataConfig(), ["prompt", "completion", "meta"], tiny_tokenizer).name == "prompt_completion"
    assert choose_format(DataConfig(template="qa"), ["instruction", "output"], tiny_tokenizer).name == "prompt_completion"


# ----------------------------------------------------------------------------- chat


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_spans_cover_every_assistant_turn_and_end_token(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    ex = fmt({"messages": CONV})
    assert ex.text == chat_tokenizer.apply_chat_template(CONV, tokenize=False)
    trained = [t for t, tr in ex.segments if tr]
    assert trained == ["Hello!<|im_end|>", "4<|im_end|>"]
    untrained = "".join(t for t, tr in ex.segments if not tr)
    assert "Be brief." in untrained and "2+2?" in untrained and "<|im_start|>assistant\n" in untrained


def test_sharegpt_is_accepted(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "conversations")
    ex = fmt({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    assert [t for t, tr in ex.segments if tr] == ["Yo<|im_end|>"]


def test_chat_without_generation_markers(chat_tokenizer):
    """A Llama-2-like template with no {% generation %} and turns glued without separators."""
    chat_tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    ex = fmt({"messages": CONV[1:]})
    assert [t for t, tr in ex.segments if tr] == [" Hello!<|endoftext|>", " 4<|endoftext|>"]


def test_inconsistent_template_fails_clearly(chat_tokenizer):
    # renders only the last assistant message's content differently depending on history length
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<final>{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    with pytest.raises(DataError, match="renders earlier turns differently"):
        fmt({"messages": CONV})


def test_messages_without_assistant_is_bad_row(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    with pytest.raises(BadRow, match="no assistant turn"):
        fmt({"messages": [{"role": "user", "content": "hi"}]})


def test_messages_need_a_chat_template(tiny_tokenizer):
    with pytest.raises(ConfigError, match="chat_template"):
        MessagesFormat(DataConfig(), tiny_tokenizer, "messages")


def test_named_templates_listed():
    assert set(NAMED_TEMPLATES) == {"qa", "alpaca", "alpaca_h4"}
