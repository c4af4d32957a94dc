"""Unit tests of sftune.data.chat: conversations (messages or ShareGPT) rendered by the chat template,
with the trained span of every assistant turn; which turns train, their weights, and bad rows.
(Every turn of many template families against inference: test_data_chat_templates.py.)"""

import pytest

from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat
from sftune.data.contract import BadRow
from sftune.data.templates import CHATML
from sftune.errors import ConfigError


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


def trained_texts(rendered):
    """The trained text of every turn of every rendered sequence, in order."""
    return [seq.text[s:e] for seq in rendered.sequences for t in seq.turns for s, e, _ in t.spans]


def test_chat_spans_cover_every_assistant_turn_and_end_token(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    r = fmt.render({"messages": CONV})
    assert len(r.sequences) == 1 and r.expanded == 0
    seq = r.sequences[0]
    assert seq.text == chat_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert trained_texts(r) == ["Hello!<|im_end|>", "4<|im_end|>"]
    for turn, i in zip(seq.turns, (2, 4)):  # each context is the inference prompt at that turn
        assert seq.text[:turn.context] == chat_tokenizer.apply_chat_template(CONV[:i], tokenize=False,
                                                                             add_generation_prompt=True)


def test_sharegpt_is_accepted(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "conversations")
    r = fmt.render({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})
    assert trained_texts(r) == ["Yo<|im_end|>"]


def test_chat_without_generation_markers(chat_tokenizer):
    """A Llama-2-like template with no {% generation %} and turns glued without separators."""
    chat_tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    r = fmt.render({"messages": CONV[1:]})
    assert trained_texts(r) == [" Hello!<|endoftext|>", " 4<|endoftext|>"]


def test_template_that_is_not_prefix_stable_expands_turn_by_turn(chat_tokenizer):
    # marks the last assistant message: each turn renders differently once later turns follow
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<final>{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    r = fmt.render({"messages": CONV})
    assert len(r.sequences) == 2 and r.expanded == 1 and r.why
    for seq, i in zip(r.sequences, (2, 4)):
        prompt = chat_tokenizer.apply_chat_template(CONV[:i], tokenize=False, add_generation_prompt=True)
        assert seq.text.startswith(prompt) and seq.turns[0].context == len(prompt)


def test_train_on_last_assistant_and_per_message_control(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(train_on="last_assistant"), chat_tokenizer, "messages")
    assert trained_texts(fmt.render({"messages": CONV})) == ["4<|im_end|>"]
    conv = [dict(m) for m in CONV]
    conv[2]["train"] = False
    conv[4]["weight"] = 0.5
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    r = fmt.render({"messages": conv})
    assert trained_texts(r) == ["4<|im_end|>"] and r.sequences[0].turns[0].spans[0][2] == 0.5
    conv[4]["weight"] = -1
    with pytest.raises(BadRow, match="weight"):
        fmt.render({"messages": conv})


def test_messages_without_assistant_is_bad_row(chat_tokenizer):
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    with pytest.raises(BadRow, match="no assistant turn"):
        fmt.render({"messages": [{"role": "user", "content": "hi"}]})


def test_messages_need_a_chat_template(tiny_tokenizer):
    with pytest.raises(ConfigError, match="chat_template"):
        MessagesFormat(DataConfig(), tiny_tokenizer, "messages")


def test_template_without_end_token_is_a_bad_row_naming_it(chat_tokenizer):
    """No end-of-turn token and the next message opens with plain text: nothing says where the
    model stops, so the row is refused (it used to train the reply with no stop at all)."""
    chat_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = MessagesFormat(DataConfig(), chat_tokenizer, "messages")
    with pytest.raises(BadRow, match=r"message 2 \(assistant\): the chat template of .* writes no end-of-turn token"
                                     r" after it and the next message opens with 'user: ', no single token"):
        fmt.render({"messages": CONV})
