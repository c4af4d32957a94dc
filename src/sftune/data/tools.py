"""Tool calling in chat data: the ``tools`` column, tool calls and tool results, and what a chat
template does with them.

* :func:`parse_tools` / :func:`parse_kwargs`: a row's tool schemas (a list of JSON schemas, or a
  JSON string of one) and its ``chat_template_kwargs`` (an object, or a JSON string of one).
* :func:`normalize_tool_calls`: an assistant message's calls in the Hugging Face convention
  (``{"type": "function", "id", "function": {"name", "arguments"}}``), from that form, the flat
  ``{"name", "arguments"}`` one, or OpenAI's JSON-string ``arguments``.
* :func:`sharegpt_call` / ShareGPT ``function_call`` and ``observation`` messages (LLaMA-Factory,
  APIGen-MT) become assistant tool calls and tool results.
* :func:`arguments_forms` / :func:`convert_arguments`: a call's ``arguments`` are passed in the
  row's form (an object, the Hugging Face convention, or a JSON string) and converted only where
  rendering shows the template cannot write that form (the render fails, drops it, writes a Python
  repr, or encodes a string again).
* :func:`perturbed`: the same message with every text it carries changed at both ends, so comparing
  two renders finds where the template writes the message (its first and last own character).
* :func:`check_rendered`: a template that silently drops a tool call or a tool result is an error
  naming the template and the message.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

from sftune.data.contract import BadRow

MARK = "\u2063"  # INVISIBLE SEPARATOR: not whitespace, so templates that trim keep it
UNWRITTEN_REASONING = "rows with reasoning the chat template does not write (not in context, not trained)"
CONVERTED = "rows with tool-call arguments converted to the template's form (JSON string <-> object)"


def parse_tools(value: Any, column: str) -> list[dict] | None:
    """``None``/empty -> ``None``; a list of schemas (or a JSON string of one) -> the list."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"the tools are a string that is not JSON ({e.msg} at character {e.pos})", column,
                         "give a list of JSON schemas, or a JSON string of one") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow(f"the tools are {type(value).__name__}, expected a list of JSON schemas", column,
                     "give a list of objects such as {\"type\": \"function\", \"function\": {\"name\": ...}}")
    return value or None


def read_tools_file(path: str) -> list[dict]:
    """``--tools FILE``: a JSON file holding a list of tool schemas (or one schema)."""
    from pathlib import Path

    from sftune.errors import DataError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the tools file: {e.strerror}", source=path) from None
    try:
        tools = parse_tools(text, "tools")
    except BadRow as e:
        raise DataError(e.message, source=path, hint=e.hint) from None
    if not tools:
        raise DataError("the tools file holds no tool schema", source=path,
                        hint="write a JSON list of schemas such as [{\"type\": \"function\", \"function\": {...}}]")
    return tools


def parse_kwargs(value: Any, column: str) -> dict:
    """A row's ``chat_template_kwargs``: an object, or a JSON string of one (``None``: none)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise BadRow("chat_template_kwargs is not an object", column,
                     "give an object such as {\"enable_thinking\": false}, or a JSON string of one")
    return value


def _call_of(call: Any, where: str, column: str) -> dict:
    if not isinstance(call, dict):
        raise BadRow(f"{where} is {type(call).__name__}, expected an object with a name and arguments", column)
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRow(f"{where} has no function name", column,
                     "write calls as {\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}}")
    args = fn.get("arguments", fn.get("parameters", {}))
    if args is None:
        args = {}
    out = {"type": call.get("type") or "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def normalize_tool_calls(value: Any, i: int, column: str) -> list[dict]:
    """An assistant message's ``tool_calls`` in the Hugging Face convention."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(f"message {i} has tool_calls that are a string but not JSON", column) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise BadRow(f"message {i} has tool_calls of type {type(value).__name__}, expected a list", column)
    return [_call_of(c, f"message {i} tool call {k}", column) for k, c in enumerate(value)]


def sharegpt_call(value: Any, i: int, column: str, counter: int) -> list[dict]:
    """A ShareGPT ``function_call`` value (a JSON call, or a list of them) -> tool calls with
    9-character ids (the length Mistral's templates require) when the data has none."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRow(f"message {i} is a function_call whose value is not JSON", column,
                         "write the call as {\"name\": ..., \"arguments\": {...}}") from None
    calls = normalize_tool_calls(value, i, column)
    for k, c in enumerate(calls):
        c.setdefault("id", f"call{counter + k:05d}")
    return calls


def split_observation(msg: dict, earlier: list[dict]) -> list[dict]:
    """A ShareGPT ``observation`` answering several calls at once (APIGen-MT: a JSON list with one
    result per call) -> one tool message per call; any other observation stays one message."""
    last = earlier[-1] if earlier else {}
    n = len(last.get("tool_calls") or []) if last.get("role") == "assistant" else 0
    if n < 2:
        return [msg]
    try:
        results = json.loads(msg["content"])
    except (json.JSONDecodeError, TypeError):
        return [msg]
    if not isinstance(results, list) or len(results) != n:
        return [msg]
    out = []
    for r in results:
        part = {k: v for k, v in msg.items() if k not in ("tool_call_id", "name")}
        content = r.get("content", r) if isinstance(r, dict) else r
        part["content"] = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        out.append(part)
    return out


def tool_content(content: Any) -> Any:
    """A tool result given as an object or list is passed as its JSON text."""
    if isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)
    return content


# ----------------------------------------------------------------------------- what a template does


def arguments_forms(render: Callable[[list[dict], list[dict]], str]) -> tuple[bool, bool]:
    """Which forms of ``arguments`` the template writes as arguments, decided by rendering:
    ``(object_ok, string_ok)``. An object is refused where the render fails, drops it or writes its
    Python repr (``{'city': 'Paris'}``); a JSON string where the render fails, drops it or encodes
    it again (``"{\\"city\\": ...}"``). A template with its own object syntax
    (``call:f{city:<q>Paris<q>}``) takes objects. ``render(messages, tools)`` renders a conversation."""
    tools = [{"type": "function", "function": {"name": "probe_fn", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}]

    def attempt(args):
        msgs = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "id": "abcdefghi", "function": {"name": "probe_fn", "arguments": args}}]}]
        try:
            return render(msgs, tools)
        except Exception:  # noqa: BLE001 - a template that cannot take this form
            return ""

    obj = {"k" + MARK: "v" + MARK}
    text = attempt(obj)
    object_ok = "k" + MARK in text and "v" + MARK in text and repr(obj) not in text
    string = json.dumps(obj, ensure_ascii=False)
    string_ok = string in attempt(string)
    return object_ok, string_ok


def convert_arguments(messages: list[dict], forms: tuple[bool, bool], column: str) -> int:
    """Each call's arguments in the row's form where the template writes that form
    (:func:`arguments_forms`), else converted (a JSON string parsed, an object dumped with
    ``ensure_ascii=False``); returns how many were converted."""
    object_ok, string_ok = forms
    n = 0
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            fn = call["function"]
            args = fn["arguments"]
            if isinstance(args, str) and not string_ok and object_ok:
                try:
                    fn["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise BadRow(f"message {i}: the arguments of {fn['name']!r} are not JSON ({e.msg})", column,
                                 "give arguments as an object or a JSON string of one") from None
                n += 1
            elif not isinstance(args, str) and not object_ok and string_ok:
                fn["arguments"] = json.dumps(args, ensure_ascii=False)
                n += 1
    return n


def perturbed(message: dict) -> dict:
    """The message with each non-empty text it carries (content, reasoning, call names and
    arguments) changed at its first and last character, ids and structure kept."""
    m = copy.deepcopy(message)

    def mark(s):
        return MARK + s + MARK if isinstance(s, str) and s else s

    for key in ("content", "reasoning_content", "thinking"):
        if m.get(key):
            m[key] = mark(m[key])
    for call in m.get("tool_calls") or []:
        fn = call["function"]
        fn["name"] = mark(fn["name"])
        args = fn["arguments"]
        fn["arguments"] = ({MARK: MARK, **args, MARK * 2: MARK} if isinstance(args, dict)
                           else mark(args) if isinstance(args, str) else args)
    return m


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def common_suffix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


def marked(messages: list[dict]) -> tuple[list[dict], list[tuple[str, str]]]:
    """A copy in which every tool call's arguments and every tool result carry a marker of their
    own; and ``(marker, what)`` for each, to look for in the rendering."""
    out, marks = copy.deepcopy(messages), []
    for i, m in enumerate(out):
        for k, call in enumerate(m.get("tool_calls") or []):
            tag = f"{MARK}{i}.{k}{MARK}"
            fn = call["function"]
            if isinstance(fn["arguments"], dict):
                fn["arguments"] = {**fn["arguments"], tag: tag}
            elif isinstance(fn["arguments"], str):
                fn["arguments"] = fn["arguments"] + tag
            else:
                continue
            marks.append((tag, f"tool call {k} ({fn['name']!r}) of message {i}"))
        if m["role"] == "tool" and isinstance(m.get("content"), str):
            tag = f"{MARK}{i}{MARK}"
            m["content"] = m["content"] + tag
            marks.append((tag, f"the tool result in message {i}"))
    return out, marks


def check_rendered(render: Callable[[list[dict]], str], messages: list[dict], template: str, column: str) -> None:
    """Every tool call and every tool result must be written by the template: rendered with a
    marker in each, each marker must appear."""
    copy_, marks = marked(messages)
    try:
        text = render(copy_)
    except BadRow:
        return  # a template that refuses the markers: the unmarked rendering decides
    for tag, what in marks:
        if tag not in text:
            raise BadRow(f"{template} drops {what}: it does not appear in the rendered conversation", column,
                         "use a chat template that renders tool calls and results (some take one call per message), "
                         "or set data.on_bad_row=skip to skip such rows")
