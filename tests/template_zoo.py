"""A zoo of chat templates, generated, for the turn-rule tests (test_data_template_zoo.py).

Each :class:`Style` varies one thing independently of the others: the turn header, the end-of-turn
token (its own token, the tokenizer's EOS, or none: the model stops on the token that opens the next
message), what is written right after the end token, a newline that non-assistant messages write
only when more follows, what the generation prompt pre-fills, how tool calls are written, what
happens to reasoning, whether the tags are special tokens, added tokens or plain text, and the
tokenizer (byte-level or SentencePiece-style).

:func:`expected_turn` is the oracle: from the generator's own knowledge of what each turn writes
(not from sftune), the text trained after the inference prompt, stop token included.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

HEADERS = {  # name: (header of a message, its own end-of-turn token)
    "chatml": ("<|im_start|>{role}\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    "role": ("<|{role}|>\n", "<|endofturn|>"),  # an end token no list knows: found from the template
}
PREFILLS = {"none": "", "empty_think": "<think>\n\n</think>\n\n", "open_think": "<think>\n",
            "channel": "<|channel|>final<|message|>"}
STRUCTURE = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|endofturn|>"]
TAGS = ["<think>", "</think>", "<reasoning>", "</reasoning>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]",
        "<call>", "</call>", "<q>", "<|channel|>", "<|message|>"]
TAG = re.compile(r"<[^<>\s]+>|\[[A-Z_]+\]")

DIMENSIONS = {
    "header": list(HEADERS),
    "end": ["own", "eos", "none"],
    "glue": ["nl", "tight", "token"],  # after the end token: a newline, nothing, or a token (<s>)
    "lastnl": [False, True],
    "prefill": list(PREFILLS),
    "calls": ["json", "xml", "special", "own"],
    "reasoning": ["kept", "dropped", "last", "moved"],
    "tags": ["special", "added", "plain"],
    "tokenizer": ["bytelevel", "metaspace"],
}


@dataclass(frozen=True)
class Style:
    header: str
    end: str
    glue: str
    lastnl: bool
    prefill: str
    calls: str
    reasoning: str
    tags: str
    tokenizer: str

    @property
    def name(self) -> str:
        return "-".join(str(getattr(self, k)) for k in DIMENSIONS)

    @property
    def end_token(self) -> str:
        return {"own": HEADERS[self.header][1], "eos": "</s>", "none": ""}[self.end]

    @property
    def glue_text(self) -> str:
        return {"nl": "\n", "tight": "", "token": "<s>"}[self.glue]

    def header_text(self, role: str) -> str:
        return HEADERS[self.header][0].format(role=role)

    def opener(self, role: str) -> str:
        """The token that opens a message of ``role`` (where a template without end token stops)."""
        return {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}.get(self.header, f"<|{role}|>")


def styles() -> list[Style]:
    """The full product (less the one contradiction: a token glued after no end token)."""
    out = []
    for values in itertools.product(*DIMENSIONS.values()):
        s = Style(*values)
        if not (s.end == "none" and s.glue == "token"):
            out.append(s)
    return out


# ----------------------------------------------------------------------------- the template

def _lit(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def template(s: Style) -> str:
    """The Jinja chat template of a style."""
    hdr = {r: _lit(s.header_text(r)) for r in ("system", "user", "assistant", "tool")}
    end, glue = _lit(s.end_token), _lit(s.glue_text)
    nl = "{% if not loop.last %}{{ '\\n' }}{% endif %}" if s.lastnl else ""
    think_always = s.prefill in ("open_think", "empty_think")
    think_r = "''" if s.prefill == "empty_think" else "r"
    think = "'<think>\\n' + " + think_r + " + '\\n</think>\\n\\n'"
    if s.reasoning in ("kept", "last"):
        cond = "true" if think_always else "r"
        if s.reasoning == "last":
            cond = f"({cond}) and loop.index0 > ns.last_user"
        reasoning = "{% if " + cond + " %}{{ " + think + " }}{% endif %}"
    else:
        reasoning = ""
    moved = "{% if r %}{{ '\\n<reasoning>\\n' + r + '\\n</reasoning>' }}{% endif %}" if s.reasoning == "moved" else ""
    channel = ("{% if m.tool_calls %}{{ '<|channel|>commentary<|message|>' }}{% else %}"
               "{{ '<|channel|>final<|message|>' }}{% endif %}") if s.prefill == "channel" else ""
    one_call = {
        "json": "{{ '<tool_call>\\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' + "
                "c.function.arguments | tojson + '}\\n</tool_call>' }}",
        "xml": "{{ '<function=' + c.function.name + '>\\n' }}{% for k, v in c.function.arguments.items() %}"
               "{{ '<parameter=' + k + '>\\n' + v | string + '\\n</parameter>\\n' }}{% endfor %}{{ '</function>' }}",
        "special": "{{ '[TOOL_CALLS]' + c.function.name + '[ARGS]' + c.function.arguments | tojson }}",
        "own": "{{ '<call>call:' + c.function.name + '{' }}{% for k, v in c.function.arguments.items() %}"
               "{{ k + ':<q>' + v | string + '<q>' }}{% if not loop.last %}{{ ',' }}{% endif %}{% endfor %}"
               "{{ '}</call>' }}",
    }[s.calls]
    sep = "" if s.calls in ("special", "own") else "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    calls = "{% for c in m.tool_calls or [] %}" + sep + one_call + "{% endfor %}"
    tail = nl + "{{ " + end + " + " + glue + " }}"
    return (
        "{%- set ns = namespace(last_user=-1) -%}{%- for m in messages -%}{%- if m.role == 'user' -%}"
        "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- if tools -%}{{ " + hdr["system"] + " }}{% if messages[0].role == 'system' %}"
        "{{ messages[0].content + '\\n\\n' }}{% endif %}{{ 'Tools: ' + tools | tojson + " + end + " + " + glue + " }}"
        "{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'system' -%}{%- if not tools -%}{{ " + hdr["system"] + " + m.content }}" + tail + "{%- endif -%}"
        "{%- elif m.role == 'assistant' -%}{%- set r = m.reasoning_content or '' -%}"
        "{{ " + hdr["assistant"] + " }}" + channel + reasoning + "{{ m.content or '' }}" + calls + moved
        + "{{ " + end + " + " + glue + " }}"
        "{%- else -%}{{ " + hdr["user"] + " if m.role == 'user' else " + hdr["tool"] + " }}{{ m.content }}" + tail +
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + hdr["assistant"] + " + " + _lit(PREFILLS[s.prefill]) + " }}{%- endif -%}")


# ----------------------------------------------------------------------------- the oracle

def _body(s: Style, m: dict, index: int, last_user: int) -> str:
    """What the template writes for an assistant message between its header and its end."""
    r = m.get("reasoning_content") or ""
    out = ""
    if s.prefill == "channel":
        out += "<|channel|>commentary<|message|>" if m.get("tool_calls") else "<|channel|>final<|message|>"
    if s.reasoning in ("kept", "last"):
        write = s.prefill in ("open_think", "empty_think") or bool(r)
        if write and (s.reasoning == "kept" or index > last_user):
            out += "<think>\n" + ("" if s.prefill == "empty_think" else r) + "\n</think>\n\n"
    out += m.get("content") or ""
    for k, c in enumerate(m.get("tool_calls") or []):
        name, args = c["function"]["name"], c["function"]["arguments"]
        if s.calls == "json":
            out += ("\n" if k else "") + '<tool_call>\n{"name": "' + name + '", "arguments": ' + \
                json.dumps(args, ensure_ascii=False) + "}\n</tool_call>"
        elif s.calls == "xml":
            out += ("\n" if k else "") + f"<function={name}>\n" + "".join(
                f"<parameter={a}>\n{v}\n</parameter>\n" for a, v in args.items()) + "</function>"
        elif s.calls == "special":
            out += "[TOOL_CALLS]" + name + "[ARGS]" + json.dumps(args, ensure_ascii=False)
        else:
            out += "<call>call:" + name + "{" + ",".join(f"{a}:<q>{v}<q>" for a, v in args.items()) + "}</call>"
    if s.reasoning == "moved" and r:
        out += "\n<reasoning>\n" + r + "\n</reasoning>"
    return out


def expected_turn(s: Style, conv: list[dict], i: int) -> str:
    """The text trained for assistant turn ``i`` after the inference prompt: the turn as written
    when it is the last message, less what the generation prompt already pre-fills in whole tags,
    up to and including the token at which generation stops."""
    last_user = max((k for k, m in enumerate(conv[:i + 1]) if m["role"] == "user"), default=-1)
    body = _body(s, conv[i], i, last_user)
    prefill = PREFILLS[s.prefill]
    shared = ""
    for piece in _pieces(prefill):
        if body.startswith(shared + piece):
            shared += piece
        else:
            break
    if s.end != "none":
        stop = s.end_token
    else:
        nxt = conv[i + 1]["role"] if i + 1 < len(conv) and conv[i + 1]["role"] in ("user", "tool") else "user"
        stop = ("\n" if s.glue == "nl" else "") + s.opener(nxt)
    return body[len(shared):] + stop


def _pieces(text: str) -> list[str]:
    """Tags and the text between them."""
    out, at = [], 0
    for m in TAG.finditer(text):
        if m.start() > at:
            out.append(text[at:m.start()])
        out.append(m.group())
        at = m.end()
    if at < len(text):
        out.append(text[at:])
    return out


# ----------------------------------------------------------------------------- conversations

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}]


def _call(name, args, cid):
    return {"type": "function", "id": cid, "function": {"name": name, "arguments": args}}


CONVERSATIONS = {  # name: (messages, tools)
    "plain": ([{"role": "user", "content": "What is two plus two?"},
               {"role": "assistant", "content": "It is four."}], None),
    "multi": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
               {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Say yes."},
               {"role": "assistant", "content": "Yes."}], None),
    "tool": ([{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Paris"}, "c1")]},
              {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny and warm"},
              {"role": "assistant", "content": "It is sunny in Paris."}], TOOLS),
    "parallel": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather and time?"},
                  {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", {"city": "Rome"}, "c1"),
                                                                      _call("get_time", {"tz": "CET"}, "c2")]},
                  {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny and warm"},
                  {"role": "tool", "tool_call_id": "c2", "name": "get_time", "content": "ten past two"},
                  {"role": "assistant", "content": "Sunny, and late."}], TOOLS),
    "reasoning": ([{"role": "user", "content": "What is two plus two?"},
                   {"role": "assistant", "content": "It is four.", "reasoning_content": "Two and two make four."},
                   {"role": "user", "content": "And in Paris?"},
                   {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
                    "tool_calls": [_call("get_weather", {"city": "Paris"}, "c1")]},
                   {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny and warm"},
                   {"role": "assistant", "content": "Sunny.", "reasoning_content": "The tool answered."}], TOOLS),
}
NEVER_TRAINED = ["Be brief", "What is two", "Hello there", "Say yes", "Weather in Paris", "Weather and time",
                 "sunny and warm", "ten past two", "And in Paris", "Weather in a city", "Tools:"]
CORPUS = [m["content"] for conv, _ in CONVERSATIONS.values() for m in conv if m.get("content")] * 20 + \
    ["I need the weather tool. The tool answered.\n\nTwo and two make four.\n"] * 20
