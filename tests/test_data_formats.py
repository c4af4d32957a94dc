"""Unit tests of sftune.data.formats: rows -> (text, trained) segments for the text and
prompt/completion formats, and the format chosen from the columns (chat: test_data_chat.py)."""

import pytest

from sftune.config import DataConfig
from sftune.data.formats import BadRow, PromptCompletionFormat, TextFormat, choose_format
from sftune.errors import RowSkip


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
