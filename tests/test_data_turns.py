"""The turn rule (sftune.data.turns): one regression test for each of the six failures of issue 29,
the ambiguous case refused with a message, and the argument forms decided by rendering.

Each test checks, independently of sftune's code, that every trained run's context ids are the
inference prompt's ids and that the trained text is what the template writes for that turn after
that prompt, up to and including its stop token.
"""

from __future__ import annotations

import copy
import json

import pytest

import tool_templates as TT
from test_data_chat_templates import build, decode, runs
from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat
from sftune.data.contract import BadRow
from sftune.data.tokenize import RowTokenizer
from sftune.data.tools import CONVERTED
from sftune.errors import ConfigError, DataError

BASE = ["<unk>", "<s>", "</s>"]
CORPUS = ["What is the weather in Paris? It is 22C and sunny.", "The answer is 42. 6*7 is 42.",
          '{"name": "get_weather", "arguments": {"city": "Paris"}}', "Hello there! How can I help?"] * 20
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
TOOL_CONV = [{"role": "user", "content": "Weather in Paris?"}, CALL,
             {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "22C"},
             {"role": "assistant", "content": "It is 22C."}]


def tokenizer(style: str, specials: list[str], template: str, eos: str = "</s>", added: tuple = ()):
    from tokenizers import AddedToken

    tok = build(style, BASE + specials, CORPUS, vocab_size=500)
    if added:
        tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.chat_template, tok.eos_token = template, eos
    return tok


def trained(tok, conv, tools=None, agent=None, **cfg) -> dict[int, str]:
    """Turn index -> its trained text, checking each context is the inference prompt (its ids) of
    the conversation as an agent loop passes it (``agent``, default ``conv``)."""
    fmt = MessagesFormat(DataConfig(**cfg), tok, "messages", "tools")
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="t")({"messages": [conv], "tools": [tools]})
    targets = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    prompts = {i: tok(tok.apply_chat_template((agent or conv)[:i], tools=tools, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"] for i in targets}
    got = {}
    for ids, labels in zip(out["input_ids"], out["labels"]):
        for s, e in runs(labels):
            i = next(i for i in targets if prompts[i] == ids[:s] and i not in got)
            got[i] = decode(tok, ids[:e])[len(decode(tok, ids[:s])):]  # (Metaspace decodes "▁" as a space)
    assert sorted(got) == targets, got
    return got


@pytest.fixture(params=["bytelevel", "metaspace"])
def style(request):
    return request.param


# ----------------------------------------------------------------------------- the six failures of issue 29

DS_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁sep｜>",
               "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]


def test_1_a_turn_keeps_its_first_characters(style):
    """DeepSeek-R1: the prompt ends `<think>\\n`, the call turn renders `<｜tool▁calls▁begin｜>` (plain
    text here): both go on with `<`, and the trained call lost it."""
    tok = tokenizer(style, DS_SPECIALS, TT.DEEPSEEK, "<｜end▁of▁sentence｜>")
    tok.bos_token = "<｜begin▁of▁sentence｜>"
    conv = copy.deepcopy(TOOL_CONV)  # as an agent loop passes it to this template
    conv[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    got = trained(tok, conv, TOOLS)
    want = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>')
    assert got[1] in (want, want.replace("▁", " "))


def chatml_tools(tool_message: str = "", prefill: str = "") -> str:
    """A ChatML tool template (calls as ``<tool_call>`` JSON). ``tool_message``: a Jinja branch for
    tool messages (default: written like any other message); ``prefill``: what the generation
    prompt writes after the assistant header."""
    return ("{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
            "{% for c in m.tool_calls or [] %}{{ '<tool_call>\n' + c.function | tojson + '\n</tool_call>' }}"
            "{% endfor %}{{ m.content or '' }}{{ '<|im_end|>\n' }}" + tool_message +
            "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n" + prefill + "' }}{% endif %}")


THINK_CHATML = chatml_tools(prefill="<think>\n\n</think>\n\n")


@pytest.mark.parametrize("tags", ["plain", "added"])
def test_1_never_cut_inside_a_tag(style, tags):
    """An empty-think prompt `<think>\\n\\n</think>\\n\\n` and a call turn `<tool_call>...`: the cut
    landed inside the tag (`/think><tool_call>` or `tool_call>`)."""
    added = ("<think>", "</think>", "<tool_call>", "</tool_call>") if tags == "added" else ()
    tok = tokenizer(style, ["<|im_start|>", "<|im_end|>"], THINK_CHATML, "<|im_end|>", added)
    got = trained(tok, TOOL_CONV, TOOLS)
    assert got[1] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert got[3] == "It is 22C.<|im_end|>"


def test_2_an_answer_after_stripped_reasoning_is_trained(style):
    """DeepSeek-R1: content `<think>...</think>\\n\\nThe answer is 42.` is written as `\\n\\nThe answer
    is 42.`: it was trained as its end token alone."""
    tok = tokenizer(style, DS_SPECIALS + ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                                          "<｜tool▁call▁end｜>"], TT.DEEPSEEK, "<｜end▁of▁sentence｜>")
    tok.bos_token = "<｜begin▁of▁sentence｜>"
    conv = [{"role": "user", "content": "What is 6*7?"},
            {"role": "assistant", "content": "<think>\n6*7 is 42.\n</think>\n\nThe answer is 42."}]
    assert trained(tok, conv)[1] in ("\n\nThe answer is 42.<｜end▁of▁sentence｜>", "\n\nThe answer is 42.<｜end of sentence｜>")


NEWLINE_CHATML = chatml_tools(  # a tool message ends "\n<|im_end|>" when more follows, "<|im_end|>" when it is last
    tool_message="{% elif m.role == 'tool' %}{{ '<|im_start|>tool\n' + m.content }}"
                 "{% if not loop.last %}{{ '\n' }}{% endif %}{{ '<|im_end|>\n' }}")


@pytest.mark.parametrize("prefill", ["", "<think>\n"])
def test_3_no_header_text_trained(style, prefill):
    """The prompt is not a prefix of the turn because the history's end is written differently when
    it is last: the trained turn began `\\n<|im_end|><|im_start|>assistant\\n`. With a pre-filled
    `<think>\\n` the turn does not write, the header is not trained either."""
    template = NEWLINE_CHATML.replace("'<|im_start|>assistant\n' }}{% endif %}",
                                      "'<|im_start|>assistant\n" + prefill.replace("\n", "\\n") + "' }}{% endif %}")
    tok = tokenizer(style, ["<|im_start|>", "<|im_end|>"], template, "<|im_end|>")
    conv = TOOL_CONV + [{"role": "user", "content": "And Rome?"}, dict(CALL)]
    got = trained(tok, conv, TOOLS)
    assert got[3] == "It is 22C.<|im_end|>"
    assert got[1] == got[5] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                                "<|im_end|>")


HEADER_AFTER_END = (  # the assistant's end token (EOS) is followed by the next user header, written by the turn
    "{{ '<|user|>' }}{% for m in messages %}{% if m.role == 'user' %}{{ m.content + '<|assistant|>' }}"
    "{% else %}{{ m.content + eos_token + '<|user|>' }}{% endif %}{% endfor %}")


def test_4_nothing_trained_past_the_end(style):
    """A header written right after the end token (EOS) was trained too: the model learned to open
    a new turn itself."""
    tok = tokenizer(style, ["<|user|>", "<|assistant|>"], HEADER_AFTER_END)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "It is 22C."}]
    assert trained(tok, conv) == {1: "Hello there!</s>", 3: "It is 22C.</s>"}


NO_END = ("{% for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "It is 22C."}]


def test_5_a_template_without_end_token_stops_on_the_next_role_token(style, tmp_path):
    """No end-of-turn token; the model's generation config lists the role token that opens the next
    message as EOS: it is trained as the turn's stop (it was trained with none)."""
    tok = tokenizer(style, ["<|system|>", "<|user|>", "<|assistant|>"], NO_END)
    with pytest.raises(DataError, match=r"message 2 \(assistant\): .* writes no end-of-turn token after it and the "
                                        r"next message opens with '<\|user\|>', which is no stop token"):
        trained(tok, CONV)
    assert trained(tok, CONV, stop_token="<|user|>") == {2: "Hello there!\n<|user|>", 4: "It is 22C.\n<|user|>"}
    from transformers import AutoTokenizer, GenerationConfig

    tok.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>")]).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert trained(tok, CONV) == {2: "Hello there!\n<|user|>", 4: "It is 22C.\n<|user|>"}
    fmt = MessagesFormat(DataConfig(), tok, "messages")
    assert tok.convert_tokens_to_ids("<|user|>") in fmt.stop_ids(tok)  # and generation stops there


def test_stop_token_must_be_one_token(style):
    tok = tokenizer(style, ["<|system|>", "<|user|>", "<|assistant|>"], NO_END)
    with pytest.raises(ConfigError, match="not one token"):
        trained(tok, CONV, stop_token="user:")


OWN_SYNTAX = (  # FunctionGemma-like: the template writes arguments in its own syntax, strings quoted with <q>
    "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<start>model\n' }}"
    "{% for c in m.tool_calls or [] %}{{ '<call>call:' + c.function.name + '{' }}"
    "{% for k, v in c.function.arguments.items() %}{{ k + ':<q>' + v + '<q>' }}{% if not loop.last %},{% endif %}"
    "{% endfor %}{{ '}</call>' }}{% endfor %}{{ m.content or '' }}{{ '<end>\n' }}"
    "{% else %}{{ '<start>' + m.role + '\n' + m.content + '<end>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start>model\n' }}{% endif %}")


def test_6_arguments_in_the_templates_own_syntax(style):
    """A template with its own object syntax gets the row's object (it got a JSON string, because
    the probe only recognised JSON); nothing is converted."""
    tok = tokenizer(style, ["<start>", "<end>", "<q>", "<call>", "</call>"], OWN_SYNTAX, "<end>")
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    rows = {"messages": [TOOL_CONV], "tools": [TOOLS]}
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="t")(rows)
    assert CONVERTED not in out["note"][0]
    assert trained(tok, TOOL_CONV, TOOLS)[1] == "<call>call:get_weather{city:<q>Paris<q>}</call><end>"
    # a JSON string such a template cannot write is parsed, and the report says so
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="t")({"messages": [conv], "tools": [TOOLS]})
    assert CONVERTED in out["note"][0]


# ----------------------------------------------------------------------------- argument forms by rendering

REPR = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name + '(' }}{{ c.function.arguments }}{{ ')' }}{% endfor %}{{ (m.content or '') + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_arguments_a_template_writes_as_python_repr_are_dumped():
    from sftune.data.tools import arguments_forms

    tok = tokenizer("bytelevel", ["<|im_start|>", "<|im_end|>"], REPR, "<|im_end|>")
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    assert arguments_forms(lambda m, t: tok.apply_chat_template(m, tools=t, tokenize=False)) == (False, True)
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="t")({"messages": [TOOL_CONV], "tools": [TOOLS]})
    assert CONVERTED in out["note"][0]
    agent = copy.deepcopy(TOOL_CONV)
    agent[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    assert trained(tok, TOOL_CONV, TOOLS, agent)[1] == 'get_weather({"city": "Paris"})<|im_end|>'


def test_arguments_in_the_rows_form_where_the_template_takes_both():
    """`arguments | tojson` on an object, the string itself otherwise: the row's form is passed."""
    template = REPR.replace("{{ c.function.arguments }}", "{{ c.function.arguments if c.function.arguments is string "
                                                          "else c.function.arguments | tojson }}")
    tok = tokenizer("bytelevel", ["<|im_start|>", "<|im_end|>"], template, "<|im_end|>")
    conv = copy.deepcopy(TOOL_CONV)
    conv[1]["tool_calls"][0]["function"]["arguments"] = '{"city":"Paris"}'
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="t")({"messages": [conv], "tools": [TOOLS]})
    assert CONVERTED not in out["note"][0]
    assert trained(tok, conv, TOOLS)[1] == 'get_weather({"city":"Paris"})<|im_end|>'


def test_rule_helpers_are_exact_on_token_boundaries():
    from sftune.data.turns import TokenView

    tok = tokenizer("bytelevel", ["<|im_start|>", "<|im_end|>"], REPR, "<|im_end|>", ("<think>",))
    view = TokenView(tok, ["<|im_end|>"])
    text = "<|im_start|>a<think>b"
    assert {0, 12, 13, 20, 21} <= view.starts(text)
    assert (13, 20) in view.units(text) and (0, 12) in view.units(text)
    assert view.first_atom("x<|im_end|>y", 0, 12, view.stops) == (1, "<|im_end|>")


def test_ambiguous_template_is_refused_naming_it(style):
    """The next message opens with plain text and nothing ends the turn: a bad row, never a guess."""
    tok = tokenizer(style, [], "{% for m in messages %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    fmt = MessagesFormat(DataConfig(), tok, "messages")
    with pytest.raises(BadRow, match=r"message 2 \(assistant\): the chat template writes no end-of-turn token"):
        fmt.render({"messages": CONV})
