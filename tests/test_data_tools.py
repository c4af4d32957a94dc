"""Tool calling, turn by turn, on templates that reproduce the published families' tool behaviour
(``tool_templates.py``): for every assistant turn of every conversation (single call, several
rounds with a system prompt, two parallel calls, tools offered but not used, reasoning before a
call), on byte-level and SentencePiece-style tokenizers, the context ids equal the inference prompt
rendered WITH the tools, the trained tokens decode to exactly the turn as the template writes it
up to and including its stop token, every turn is trained once, and no tool result or schema text
is trained.

The inference prompt is built here the way an agent loop builds it: ``apply_chat_template(history,
tools=tools, add_generation_prompt=True)`` with the messages in the form each family's template
takes (gpt-oss: ``thinking``, no ``content`` on a call; DeepSeek: ``content: None`` and JSON-string
arguments).
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tool_templates as TT
from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat
from sftune.data.tokenize import IGNORE, Tokenizer
from sftune.errors import DataError

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start|>", "<|end|>", "<|return|>", "<|call|>",
            "<|channel|>", "<|message|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
            "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
CORPUS = ["What is the weather in Paris? It is 22C and sunny.", '{"name": "get_weather", "arguments": {"city": "Paris"}}',
          "<tool_call>\n</tool_call>\n<tool_response>\n</tool_response>", "héllo wörld 日本語 🙂 ```json\n```",
          "You are a weather bot. Current time: 14:05, Europe/Paris.", "function functions. commentary json final"] * 30
QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

# family: template, eos, bos, stop tokens of a turn, where the turn starts when the prompt is not a prefix
FAMILIES = {
    "qwen25": (TT.QWEN25, "<|im_end|>", None, ["<|im_end|>"]),
    "qwen3": (TT.QWEN3, "<|im_end|>", None, ["<|im_end|>"]),
    "llama31": (TT.LLAMA31, "<|eot_id|>", "<|begin_of_text|>", ["<|eot_id|>", "<|eom_id|>"]),
    "mistral": (TT.MISTRAL03, "</s>", "<s>", ["</s>"]),
    "gptoss": (TT.GPTOSS, "<|return|>", None, ["<|call|>", "<|return|>"]),
    "deepseek": (TT.DEEPSEEK, "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"]),
}


def build(style: str):
    from tokenizers import AddedToken, Regex, Tokenizer as Tk, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "bytelevel":
        tok = Tk(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        byte_pieces = []
    else:
        tok = Tk(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
        byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=SPECIALS + byte_pieces, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=SPECIALS[3:], clean_up_tokenization_spaces=False)
    # Qwen's <tool_call> tags are added tokens that are not special
    out.add_tokens([AddedToken(t, special=False) for t in ("<tool_call>", "</tool_call>")])
    return out


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def base_tok(request):
    return build(request.param)


def family_tok(base, family):
    template, eos, bos, _ = FAMILIES[family]
    tok = copy.copy(base)
    tok.chat_template = template
    tok.eos_token = eos
    tok.bos_token = bos or "<s>"
    return tok


# ----------------------------------------------------------------------------- conversations

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a timezone",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                     "required": ["tz"]}}},
]


def call(name, args, cid):
    return {"type": "function", "id": cid, "function": {"name": name, "arguments": args}}


def tool(content, cid, name):
    return {"role": "tool", "tool_call_id": cid, "name": name, "content": content}


SINGLE = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, "call00001")]},
    tool("22C, sunny", "call00001", "get_weather"),
    {"role": "assistant", "content": "It is 22C and sunny in Paris."},
]
ROUNDS = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, "call00001")]},
    tool("22C, sunny", "call00001", "get_weather"),
    {"role": "assistant", "content": "22C and sunny."},
    {"role": "user", "content": "And the time there?"},
    {"role": "assistant", "content": None, "tool_calls": [call("get_time", {"tz": "Europe/Paris"}, "call00002")]},
    tool("14:05", "call00002", "get_time"),
    {"role": "assistant", "content": "It is 14:05."},
]
PARALLEL = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"city": "Paris"}, "call00001"),
                                                          call("get_time", {"tz": "Europe/Paris"}, "call00002")]},
    tool("22C, sunny", "call00001", "get_weather"),
    tool("14:05", "call00002", "get_time"),
    {"role": "assistant", "content": "22C and sunny; it is 14:05."},
]
UNUSED = [
    {"role": "user", "content": "Hello there!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
]
REASONING = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the weather tool.",
     "tool_calls": [call("get_weather", {"city": "Paris"}, "call00001")]},
    tool("22C, sunny", "call00001", "get_weather"),
    {"role": "assistant", "content": "It is 22C and sunny.", "reasoning_content": "The tool answered."},
]
CONVERSATIONS = {"single": SINGLE, "rounds": ROUNDS, "parallel": PARALLEL, "unused": UNUSED, "reasoning": REASONING}
REFUSED = {("llama31", "parallel"): "only supports single tool-calls", ("gptoss", "parallel"): "drops tool call 1"}


def agent_form(family, messages):
    """The messages as an agent loop passes them to this family's template."""
    out = copy.deepcopy(messages)
    for m in out:
        if family == "gptoss":
            if "reasoning_content" in m:
                m["thinking"] = m.pop("reasoning_content")
            if m.get("content") is None:
                m.pop("content", None)
        if family == "deepseek":  # transformers drops None values; the template then takes ""
            if m.get("tool_calls") and m.get("content") is None:
                m["content"] = ""
            for c in m.get("tool_calls") or []:
                c["function"]["arguments"] = json.dumps(c["function"]["arguments"], ensure_ascii=False)
    return out


def render(tok, family, messages, **kw):
    if not messages:
        from transformers.utils.chat_template_utils import render_jinja_template

        return render_jinja_template(conversations=[[]], tools=TOOLS, chat_template=tok.chat_template,
                                     **tok.special_tokens_map, **kw)[0][0]
    return tok.apply_chat_template(agent_form(family, messages), tools=TOOLS, tokenize=False, **kw)


def turn_start(family, upto, prompt):
    """Where the template starts writing the last turn (independent of sftune)."""
    if upto.startswith(prompt):
        return len(prompt)
    marks = {"mistral": ["[/INST]", "[/TOOL_RESULTS]"], "deepseek": ["<｜Assistant｜>", "<｜tool▁outputs▁end｜>"],
             "gptoss": None, "qwen3": ["<|im_start|>assistant\n"]}[family]
    if marks is None:  # after the last user or tool message
        last = max(upto.rfind("<|start|>user"), upto.rfind("<|start|>functions."))
        return upto.find("<|end|>", last) + len("<|end|><|start|>assistant")
    return max(upto.rfind(m) + len(m) for m in marks if m in upto)


def expected_turn(tok, family, conv, i):
    prompt = render(tok, family, conv[:i], add_generation_prompt=True)
    upto = render(tok, family, conv[:i + 1])
    start = turn_start(family, upto, prompt)
    stops = FAMILIES[family][3]
    end = min(upto.find(s, start) + len(s) for s in stops if upto.find(s, start) >= 0)
    return prompt, upto[start:end]


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(labels):
    out, start = [], None
    for k, lab in enumerate(list(labels) + [IGNORE]):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            out.append((start, k))
            start = None
    return out


def tokenize_rows(tok, rows, **cfg):
    fmt = MessagesFormat(DataConfig(**cfg), tok, "messages", "tools")
    batch = {k: [r.get(k) for r in rows] for k in ("messages", "tools")}
    return fmt, Tokenizer(fmt, tok, 100_000, on_bad_row="error", source="test")(batch)


def check(tok, family, conv, **cfg):
    fmt, out = tokenize_rows(tok, [{"messages": conv, "tools": TOOLS}], **cfg)
    assert out["skip"] == [""] * len(out["skip"]), out["skip"]
    targets = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if cfg.get("train_on") == "last_assistant":
        targets = targets[-1:]
    want = {i: expected_turn(tok, family, conv, i) for i in targets}
    prompts = {i: tok(want[i][0], add_special_tokens=False)["input_ids"] for i in targets}
    seen = []
    for ids, labels in zip(out["input_ids"], out["labels"]):
        for start, end in runs(labels):
            match = [i for i in targets if prompts[i] == ids[:start] and i not in seen]
            assert match, f"{family}: a trained run whose context is no inference prompt: {decode(tok, ids[:start])!r}"
            i = match[0]
            seen.append(i)
            prompt, turn = want[i]
            got = decode(tok, ids[start:end])
            assert decode(tok, ids[:end]) == decode(tok, tok(prompt + turn, add_special_tokens=False)["input_ids"]), \
                (family, i, got, turn)
            assert "22C, sunny" not in got and "14:05\"" not in got and "Get the current weather" not in got
    assert sorted(seen) == targets, f"{family}: turns trained {seen}, expected each of {targets} once"
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_every_tool_turn_matches_inference(base_tok, family, name):
    tok = family_tok(base_tok, family)
    conv = CONVERSATIONS[name]
    if (family, name) in REFUSED:
        with pytest.raises(DataError, match=REFUSED[family, name]):
            tokenize_rows(tok, [{"messages": conv, "tools": TOOLS}])
        return
    check(tok, family, conv)


@pytest.mark.parametrize("family", ["qwen3", "gptoss", "llama31"])
def test_last_assistant_of_trajectory(base_tok, family):
    check(family_tok(base_tok, family), family, ROUNDS, train_on="last_assistant")
