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
from test_data_chat_templates import build as build_tokenizer, decode, runs
from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat
from sftune.data.tools import CONVERTED
from sftune.data.tokenize import RowTokenizer
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
    """The chat tests' tokenizer of ``style`` with the tool templates' specials and corpus."""
    from tokenizers import AddedToken

    out = build_tokenizer(style, SPECIALS, CORPUS, vocab_size=800)
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


def tokenize_rows(tok, rows, **cfg):
    fmt = MessagesFormat(DataConfig(**cfg), tok, "messages", "tools")
    batch = {k: [r.get(k) for r in rows] for k in ("messages", "tools")}
    return fmt, RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="test")(batch)


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


# ----------------------------------------------------------------------------- arguments, reasoning, kwargs

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) |
                    st.text(st.characters(blacklist_categories=("Cs", "Cf"), blacklist_characters="<>"), max_size=8),
                    lambda children: st.lists(children, max_size=3) |
                    st.dictionaries(st.text(st.characters(blacklist_categories=("Cs", "Cf"),
                                                          blacklist_characters="<>"), max_size=6), children, max_size=3),
                    max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.dictionaries(st.text(st.characters(blacklist_categories=("Cs", "Cf"), blacklist_characters="<>"),
                                    min_size=1, max_size=6), JSON, max_size=3),
       as_string=st.booleans(), family=st.sampled_from(["qwen25", "deepseek", "gptoss", "mistral"]))
def test_property_arguments(base_tok, args, as_string, family):
    """Unicode, nested, empty arguments, given as an object or as a JSON string: the same trained
    text as an agent loop's prompt; strings are parsed for tojson templates (never double-encoded)
    and objects dumped for templates that write them as text."""
    tok = family_tok(base_tok, family)
    conv = copy.deepcopy(SINGLE)
    conv[1]["tool_calls"][0]["function"]["arguments"] = args
    data = copy.deepcopy(conv)
    if as_string:
        data[1]["tool_calls"][0]["function"]["arguments"] = json.dumps(args, ensure_ascii=False)
    fmt, out = tokenize_rows(tok, [{"messages": data, "tools": TOOLS}])
    converted = as_string != (family == "deepseek")
    assert (out["note"][0] == CONVERTED) == converted
    want = [expected_turn(tok, family, conv, i) for i in (1, 3)]
    texts = [decode(tok, ids) for ids in out["input_ids"]]
    for prompt, turn in want:
        full = decode(tok, tok(prompt + turn, add_special_tokens=False)["input_ids"])
        assert any(t.startswith(full) for t in texts), (family, turn)


def trained_text(tok, out):
    return ["".join(decode(tok, ids[a:b]) for a, b in runs(labels)) for ids, labels in zip(out["input_ids"],
                                                                                             out["labels"])]


def test_reasoning_masked_but_kept_in_context(base_tok):
    tok = family_tok(base_tok, "qwen3")
    out = check(tok, "qwen3", REASONING)  # trained by default
    assert any("I need the weather tool." in t for t in trained_text(tok, out))
    _, masked = tokenize_rows(tok, [{"messages": REASONING, "tools": TOOLS}], train_reasoning=False)
    texts = trained_text(tok, masked)
    assert not any("I need the weather tool." in t or "The tool answered." in t for t in texts)
    assert any('"get_weather"' in t for t in texts) and any("It is 22C and sunny." in t for t in texts)
    assert masked["input_ids"] == out["input_ids"]  # the same context: only the loss moves


def test_template_kwargs_from_config_and_row(base_tok):
    tok = family_tok(base_tok, "qwen3")
    fmt = MessagesFormat(DataConfig(chat_template_kwargs={"enable_thinking": False}), tok, "messages", "tools")
    assert fmt.prompt({"messages": UNUSED, "tools": TOOLS}).endswith("<think>\n\n</think>\n\n")
    assert fmt.identity()["chat_template_kwargs"] == {"enable_thinking": False}
    row = {"messages": UNUSED, "tools": TOOLS, "chat_template_kwargs": json.dumps({"enable_thinking": True})}
    assert not fmt.prompt(row).endswith("</think>\n\n")  # the row wins
    _, out = tokenize_rows(tok, [{"messages": UNUSED, "tools": TOOLS}], chat_template_kwargs={"enable_thinking": False})
    ids, labels = out["input_ids"][0], out["labels"][0]
    start = runs(labels)[0][0]
    assert decode(tok, ids[:start]).endswith("<think>\n\n</think>\n\n")


def test_template_that_drops_tool_calls_is_an_error(base_tok):
    tok = copy.copy(base_tok)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or '') + "
                         "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                         "{% endif %}")
    tok.eos_token = "<|im_end|>"
    with pytest.raises(DataError, match=r"drops tool call 0 \('get_weather'\) of message 1"):
        tokenize_rows(tok, [{"messages": SINGLE, "tools": TOOLS}])
    fmt = MessagesFormat(DataConfig(on_bad_row="skip"), tok, "messages", "tools")
    out = RowTokenizer(fmt, tok, 10_000, on_bad_row="skip", source="t")({"messages": [SINGLE, UNUSED],
                                                                       "tools": [TOOLS, TOOLS]})
    assert out["skip"][0].startswith("bad row: the chat template drops") and out["skip"][1] == ""


def test_refused_rows_follow_on_bad_row(base_tok):
    tok = family_tok(base_tok, "llama31")
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    out = RowTokenizer(fmt, tok, 10_000, on_bad_row="skip", source="t")({"messages": [PARALLEL, SINGLE],
                                                                       "tools": [TOOLS, TOOLS]})
    assert "only supports single tool-calls" in out["skip"][0] and out["skip"][-1] == ""


def test_eom_after_a_builtin_tool_call(base_tok):
    """Llama 3.1 with builtin_tools: a call turn ends with <|eom_id|>, trained, and it is a stop token."""
    tok = family_tok(base_tok, "llama31")
    conv = copy.deepcopy(SINGLE)
    conv[1]["tool_calls"][0]["function"] = {"name": "brave_search", "arguments": {"query": "Paris weather"}}
    conv[2]["name"] = "brave_search"
    kw = {"builtin_tools": ["brave_search"]}
    fmt, out = tokenize_rows(tok, [{"messages": conv, "tools": TOOLS}], chat_template_kwargs=kw)
    texts = trained_text(tok, out)
    assert any('<|python_tag|>brave_search.call(query="Paris weather")<|eom_id|>' in t for t in texts), texts
    assert tok.convert_tokens_to_ids("<|eom_id|>") in fmt.stop_ids(tok)


def test_gptoss_call_is_a_stop_token(base_tok):
    tok = family_tok(base_tok, "gptoss")
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    assert tok.convert_tokens_to_ids("<|call|>") in fmt.stop_ids(tok)


# ----------------------------------------------------------------------------- packed == unpacked


def assert_packed_equals_unpacked(vocab_size: int, examples: list[tuple[list[int], list[int]]]) -> None:
    """The loss of ``(ids, labels)`` examples packed in one row equals their losses one by one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sftune.data.packing import collate
    from sftune.loss import CausalLMWithLoss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=4096, n_embd=32, n_layer=2, n_head=2))
    lm = CausalLMWithLoss(model).eval()

    def loss(rows):
        b = collate(rows, pad_id=0)
        return lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds)

    with torch.no_grad():
        one_by_one = sum(loss([[e]]) for e in examples)
        packed = loss([examples])
    torch.testing.assert_close(packed, one_by_one, rtol=1e-4, atol=1e-4)


def test_packed_equals_unpacked_with_tool_rows():
    tok = family_tok(build("bytelevel"), "qwen25")
    _, out = tokenize_rows(tok, [{"messages": c, "tools": TOOLS} for c in (SINGLE, ROUNDS, PARALLEL, REASONING)])
    assert_packed_equals_unpacked(len(tok), list(zip(out["input_ids"], out["labels"])))


# ----------------------------------------------------------------------------- agent dataset shapes


@pytest.mark.parametrize("name", ["agent_sharegpt.json", "agent_apigen.json", "agent_openai.jsonl"])
def test_agent_datasets_load_as_they_are(base_tok, name):
    from pathlib import Path

    from sftune.data.one_source import prepare_data

    tok = family_tok(base_tok, "qwen25")
    path = Path(__file__).parent / "data" / name
    data = prepare_data(DataConfig(path=str(path), max_length=4096), tok, 4096)
    rows = json.loads(path.read_text()) if name.endswith(".json") else \
        [json.loads(line) for line in path.read_text().splitlines()]
    assert data.report.kept_rows == len(rows) and not data.report.skipped
    texts = [decode(tok, data.train.example(i)[0].tolist()) for i in range(len(data.train))]
    assert any('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in t for t in texts)
    assert all('"name": "get_weather", "description"' in t for t in texts)  # the schemas in every context
    if name != "agent_openai.jsonl":
        assert any("You are a" in t for t in texts)  # the ShareGPT system column
    if name == "agent_apigen.json":
        assert any("<tool_response>\n22C\n</tool_response>\n<tool_response>\n25C\n</tool_response>" in t
                   for t in texts)


# ----------------------------------------------------------------------------- inference side


def test_identity_rebuilds_tools_and_kwargs(base_tok):
    from sftune.data.formats import choose_format, format_from_identity

    tok = family_tok(base_tok, "qwen3")
    cfg = DataConfig(chat_template_kwargs={"enable_thinking": False}, train_reasoning=False)
    fmt = choose_format(cfg, ["messages", "tools"], tok)
    assert fmt.tools_column == "tools"
    again = format_from_identity(DataConfig(**fmt.identity()), tok)
    row = {"messages": SINGLE, "tools": TOOLS}
    assert again.prompt(row) == fmt.prompt(row)
    assert '"name": "get_weather"' in again.prompt(row) and again.prompt(row).endswith("</think>\n\n")


def test_tools_file_for_chat_and_generate(base_tok, tmp_path):
    from sftune.errors import SftuneError
    from sftune.data.formats import TextFormat
    from sftune.inference import Loaded

    tok = family_tok(base_tok, "qwen25")
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    loaded = Loaded(None, tok, None, MessagesFormat(DataConfig(), tok, "messages"), "run")
    assert "get_weather" not in loaded.prompt_from_text("Weather?")
    loaded.use_tools(str(tmp_path / "tools.json"))
    prompt = loaded.prompt_from_text("Weather?")
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Weather?"}], tools=TOOLS, tokenize=False,
                                             add_generation_prompt=True)
    assert loaded.fmt.prompt({"messages": UNUSED}) == render(tok, "qwen25", UNUSED[:1], add_generation_prompt=True)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        loaded.use_tools(str(tmp_path / "bad.json"))
    text = Loaded(None, tok, None, TextFormat(DataConfig()), "run")
    with pytest.raises(SftuneError, match="needs a chat model"):
        text.use_tools(str(tmp_path / "tools.json"))


def test_config_keys_from_the_command_line():
    from sftune.config import load_config

    cfg = load_config(None, ["data.chat_template_kwargs={enable_thinking: false, date_string: 26 Jul 2024}",
                             "data.train_reasoning=false", "data.tools_column=functions"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False, "date_string": "26 Jul 2024"}
    assert cfg.data.train_reasoning is False and cfg.data.tools_column == "functions"


def test_train_false_and_weight_on_call_turns(base_tok):
    tok = family_tok(base_tok, "qwen25")
    conv = copy.deepcopy(ROUNDS)
    conv[2]["train"] = False  # the first call: context only
    conv[6]["weight"] = 0.5
    _, out = tokenize_rows(tok, [{"messages": conv, "tools": TOOLS}])
    texts = trained_text(tok, out)
    assert not any('"city": "Paris"' in t for t in texts) and any('"tz": "Europe/Paris"' in t for t in texts)
    weights = {round(w, 3) for ws in out["weights"] for w in ws if w}
    assert weights == {0.5, 1.0}


def test_gptoss_thinking_before_a_call(base_tok):
    """gpt-oss writes `thinking` (not reasoning_content) as an analysis message: trained with the
    call turn when the call is the last message, dropped from history once a final answer follows."""
    tok = family_tok(base_tok, "gptoss")
    conv = copy.deepcopy(REASONING)
    for m in conv:
        if "reasoning_content" in m:
            m["thinking"] = m.pop("reasoning_content")
    out = check(tok, "gptoss", conv)
    texts = trained_text(tok, out)
    assert any(t.startswith("<|channel|>analysis<|message|>I need the weather tool.<|end|><|start|>assistant to=")
               and t.endswith("<|call|>") for t in texts), texts
    out = check(tok, "gptoss", REASONING)  # reasoning_content: transformers passes it as `thinking` too
    assert any(t.startswith("<|channel|>analysis<|message|>I need the weather tool.<|end|>")
               for t in trained_text(tok, out))


def test_reasoning_a_template_does_not_write_is_reported(base_tok):
    from sftune.data.tools import UNWRITTEN_REASONING

    _, out = tokenize_rows(family_tok(base_tok, "llama31"), [{"messages": REASONING, "tools": TOOLS}])
    assert UNWRITTEN_REASONING in out["note"][0]


def test_a_configured_tools_column_must_exist(base_tok):
    from sftune.data.formats import choose_format
    from sftune.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'tools'"):
        choose_format(DataConfig(tools_column="tool"), ["messages", "tools"], family_tok(base_tok, "qwen25"))
