"""Chat data: conversations rendered with a chat template, turn by turn.

For each assistant turn ``i`` the context is ``apply_chat_template(messages[:i], tools=...,
add_generation_prompt=True, **chat_template_kwargs)`` and the trained text is what the template
writes for turn ``i`` (rendered as the last message) after that prompt, up to and including the
token at which generation stops or hands over: the one rule of :func:`sftune.data.turns.turn_text`.
Tool calls, results and schemas: see :mod:`sftune.data.tools`. When
the whole conversation rendered at once starts with that context followed by that turn (a
prefix-stable template), the turn is trained inside one sequence per conversation; otherwise
(templates that strip earlier reasoning, end the final turn differently, drop the system prompt, or
whose generation prompt is not a prefix of the turn) it gets a sequence of its own, rendered exactly
as at inference, and the data report counts it.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from sftune.config import DataConfig
from sftune.data.tools import (CONVERTED, MARK, UNWRITTEN_REASONING, arguments_forms, check_rendered,
                               convert_arguments, normalize_tool_calls, parse_kwargs, parse_tools,
                               sharegpt_call, split_observation, tool_content)
from sftune.data.turns import TokenView, stop_tokens, turn_text
from sftune.data.contract import BadRow, Format, Rendered, Sequence, Turn, end_of_turn_ids
from sftune.errors import ConfigError, RowSkip

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
                   "function_call": "assistant"}
_PASS_THROUGH = ("reasoning_content", "thinking", "tool_calls", "tool_call_id", "name")


def normalize_messages(value: Any, column: str, *, need_assistant: bool = True) -> list[dict]:
    """``[{role, content}]`` or ShareGPT ``[{from, value}]`` -> ``[{role, content, ...}]``.

    Kept per message: ``reasoning_content``/``thinking``, tool fields, and sftune's ``train``
    (bool) and ``weight`` (float >= 0), which are validated here and never passed to the template.
    """
    if not isinstance(value, list) or not value:
        raise BadRow("expected a non-empty list of messages", column)
    out, calls = [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"message {i} is {type(m).__name__}, expected an object with role and content", column)
        share_calls = None
        if "role" in m and m.get("role") is not None:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = _SHAREGPT_ROLES.get(str(m.get("from")).lower(), m.get("from")), m.get("value")
            if str(m.get("from")).lower() == "function_call":  # LLaMA-Factory / APIGen-MT: the value is the call
                share_calls, content = sharegpt_call(content, i, column, len(calls)), ""
        else:
            raise BadRow(f"message {i} has neither 'role' nor 'from'", column)
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRow(f"message {i} has the unknown role {role!r} (use system, user, assistant or tool)", column)
        if content is None and role == "assistant" and (m.get("tool_calls") or m.get("reasoning_content")
                                                        or m.get("thinking")):
            content = ""
        if role == "tool":
            content = tool_content(content)
        if not isinstance(content, str):
            raise BadRow(f"message {i} content is {type(content).__name__}, expected a string", column)
        msg = {"role": role, "content": content}
        for key in _PASS_THROUGH:
            if m.get(key) is not None:
                msg[key] = m[key]
        if share_calls is not None:
            msg["tool_calls"] = share_calls
        if msg.get("tool_calls") is not None:
            if role != "assistant":
                raise BadRow(f"message {i} is a {role} message with tool_calls; only assistant messages call tools",
                             column)
            msg["tool_calls"] = normalize_tool_calls(msg["tool_calls"], i, column)
            if not msg["tool_calls"]:
                del msg["tool_calls"]
            calls += msg.get("tool_calls", [])
        train, weight = m.get("train", True), m.get("weight", 1.0)
        if not isinstance(train, bool):
            raise BadRow(f"message {i} has train={train!r}; use true or false", column)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise BadRow(f"message {i} has weight={weight!r}; use a finite number >= 0", column)
        msg["_weight"] = float(weight) if train else 0.0
        parts = split_observation(msg, out) if role == "tool" and "from" in m else [msg]
        for part in parts:
            if role == "tool":
                _link_result(part, calls, out)
            out.append(part)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRow("the conversation has no assistant turn, so nothing would be trained", column,
                     "add an assistant reply, or set data.on_bad_row=skip to skip such rows")
    return out


_ABSENT = object()  # a message key left out


def _link_result(msg: dict, calls: list[dict], earlier: list[dict]) -> None:
    """A tool result without ``tool_call_id`` / ``name`` gets those of the call it answers (the
    calls of the last assistant message, in order)."""
    answered = 0
    while answered < len(earlier) and earlier[len(earlier) - 1 - answered]["role"] == "tool":
        answered += 1
    before = earlier[len(earlier) - 1 - answered] if answered < len(earlier) else {}
    own = before.get("tool_calls") or [] if before.get("role") == "assistant" else []
    call = None
    if msg.get("tool_call_id") is not None:
        call = next((c for c in calls if c.get("id") == msg["tool_call_id"]), None)
    elif answered < len(own):
        call = own[answered]
        if call.get("id") is not None:
            msg["tool_call_id"] = call["id"]
    if call is not None and msg.get("name") is None:
        msg["name"] = call["function"]["name"]


def _public(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]


class MessagesFormat(Format):
    """Chat data rendered with a chat template, turn by turn (see the module docstring)."""

    name = "messages"
    add_bos = False

    def __init__(self, cfg: DataConfig, tokenizer, column: str, tools_column: str | None = None):
        self.column = column
        self.tools_column = tools_column or cfg.tools_column
        self.columns = [column]
        self.tokenizer = tokenizer
        self.train_on = cfg.train_on
        self.kwargs = dict(cfg.chat_template_kwargs or {})
        self.train_reasoning = cfg.train_reasoning
        self.tools: list[dict] | None = None
        """Tool schemas for prompts built without a data row (``chat`` / ``generate --tools``)."""
        self._forms: tuple[bool, bool] | None = None  # the argument forms the template writes (tools.arguments_forms)
        self._view: TokenView | None = None  # the tokenizer as the turn rule sees it (turns.TokenView)
        self.stop_token = cfg.stop_token
        self._reasoning_key: str | None = None
        self._empty: tuple | None = None  # how a call turn without text is passed (_empty_call_content)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the messages format needs a chat template, and this tokenizer has none. "
                "Set data.chat_template=chatml (adds <|im_start|>/<|im_end|>), data.chat_template=simple "
                "(uses the EOS token), or a Jinja template."
            )

    @property
    def is_chat(self) -> bool:
        return True

    @property
    def template_name(self) -> str:
        where = getattr(self.tokenizer, "name_or_path", "") or ""
        return f"the chat template of {where}" if where else "the chat template"

    def identity(self) -> dict:
        out = {"format": "messages", "messages_column": self.column, "train_on": self.train_on}
        if self.tools_column:
            out["tools_column"] = self.tools_column
        if self.kwargs:
            out["chat_template_kwargs"] = self.kwargs
        if not self.train_reasoning:
            out["train_reasoning"] = False
        if self.stop_token:
            out["stop_token"] = self.stop_token
        return out

    def cache_key(self) -> str:
        extra = json.dumps([self.tools_column, self.kwargs, self.train_reasoning] + ([self.stop_token] if self.stop_token
                           else []), sort_keys=True, default=str)
        return hashlib.sha256(((self.tokenizer.chat_template or "") + extra).encode()).hexdigest()[:16]

    # -- what a row passes to every render: its tools and template arguments
    def row_extra(self, row: dict, *, default_tools: bool = False) -> dict:
        tools = parse_tools(row.get(self.tools_column), self.tools_column) if self.tools_column else None
        kwargs = {**self.kwargs, **parse_kwargs(row.get("chat_template_kwargs"), "chat_template_kwargs")}
        return {"tools": tools if tools is not None or not default_tools else self.tools, "kwargs": kwargs}

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False, *, index: int | None = None,
                    extra: dict | None = None) -> str:
        extra = extra or {}
        tools = extra.get("tools")
        kwargs = {k: v for k, v in (extra.get("kwargs") or self.kwargs).items()
                  if k not in ("tokenize", "add_generation_prompt", "conversation", "tools", "chat_template")}
        try:
            if not messages:  # an assistant-first conversation: the template's own text for "no history"
                rendered, _ = render_jinja_template(
                    conversations=[[]], tools=tools, chat_template=self.tokenizer.get_chat_template(),
                    add_generation_prompt=add_generation_prompt, **{**self.tokenizer.special_tokens_map, **kwargs})
                return rendered[0]
            return self.tokenizer.apply_chat_template(self.public_messages(messages), tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # jinja errors, raise_exception() in templates
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            at = f" (rendering messages 0..{index})" if index is not None else ""
            raise BadRow(f"the chat template failed to render this conversation{at}: {first}", self.column,
                         "fix the conversation, or set data.on_bad_row=skip to skip such rows") from None

    def public_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the template is given them: sftune's keys dropped, a call turn without
        text in the form the template takes."""
        out = _public(messages)
        if any(m.get("tool_calls") and not m.get("content") for m in out):
            empty = self._empty_call_content()
            for m in out:  # a call turn with no text: None, "" or no key, whichever the template takes
                if m.get("tool_calls") and not m.get("content"):
                    if empty is _ABSENT:
                        m.pop("content", None)
                    else:
                        m["content"] = empty
        return out

    def _empty_call_content(self):
        """How a tool-call message without text must be written for this template: DeepSeek's test
        ``content is none``, gpt-oss's fail on ``None`` and take ``""``."""
        if self._empty is None:
            for candidate in (None, "", _ABSENT):
                call = {"role": "assistant", "tool_calls": [
                    {"type": "function", "id": "abcdefghi", "function": {"name": "probe" + MARK, "arguments": "{}"}}]}
                if candidate is not _ABSENT:
                    call["content"] = candidate
                ok = False
                for args in ("{}", {}):
                    call["tool_calls"][0]["function"]["arguments"] = args
                    try:
                        text = self.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, call],
                                                                  tokenize=False, **self.kwargs)
                    except Exception:  # noqa: BLE001 - this form is refused: try the next
                        continue
                    ok = ok or "probe" + MARK in text
                if ok:
                    self._empty = (candidate,)
                    break
            if self._empty is None:
                self._empty = (None,)
        return self._empty[0]

    def _reasoning(self) -> str:
        """The message key the template writes reasoning from (transformers passes it under both
        ``reasoning_content`` and ``thinking``, gpt-oss's name), or ``""`` when it writes none."""
        if self._reasoning_key is None:
            self._reasoning_key = ""
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
            for key in ("reasoning_content", "thinking"):
                try:
                    text = self.tokenizer.apply_chat_template([msgs[0], {**msgs[1], key: MARK + "r"}],
                                                              tokenize=False, **self.kwargs)
                except Exception:  # noqa: BLE001 - a template that cannot render the probe
                    continue
                if MARK + "r" in text:
                    self._reasoning_key = key
                    break
        return self._reasoning_key

    def _arguments_forms(self) -> tuple[bool, bool]:
        if self._forms is None:
            self._forms = arguments_forms(
                lambda msgs, tools: self.render_text(msgs, extra={"tools": tools, "kwargs": self.kwargs}))
        return self._forms

    def messages_of(self, row: dict, *, need_assistant: bool = True) -> tuple[list[dict], int]:
        """The row's messages, tool-call arguments in the template's form; and how many were converted."""
        messages = normalize_messages(row.get(self.column), self.column, need_assistant=need_assistant)
        system = row.get("system")
        raw = row.get(self.column)
        if isinstance(system, str) and system.strip() and messages[0]["role"] != "system" and \
                isinstance(raw[0], dict) and "from" in raw[0]:  # LLaMA-Factory's ShareGPT: the system prompt apart
            messages.insert(0, {"role": "system", "content": system, "_weight": 0.0})
        converted = 0
        if any(m.get("tool_calls") for m in messages):
            converted = convert_arguments(messages, self._arguments_forms(), self.column)
        return messages, converted

    # -- the turn as the template writes it: the rule of sftune.data.turns
    def turn_text(self, messages: list[dict], i: int, prompt: str, extra: dict | None = None) -> str:
        """What is trained for assistant turn ``i`` after the inference ``prompt``: see
        :func:`sftune.data.turns.turn_text` (the one rule)."""
        return turn_text(lambda msgs: self.render_text(msgs, index=i, extra=extra),
                         lambda msgs: self.render_text(msgs, add_generation_prompt=True, index=i, extra=extra),
                         messages, i, prompt, self.view(), self.template_name, self.column)

    def view(self) -> TokenView:
        """The tokenizer as the turn rule sees it, with this template's stop tokens."""
        if self._view is None:
            self._view = TokenView(self.tokenizer, [])
            self._view = TokenView(self.tokenizer, stop_tokens(self.tokenizer, self._view, self._probe_end(),
                                                               self.stop_token))
        return self._view

    def _probe_end(self) -> str | None:
        """The token this template writes right after a plain reply when it is the last message."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": MARK + "hello" + MARK}]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, **self.kwargs)
        except Exception:  # noqa: BLE001 - a template that cannot render the probe
            return None
        end = text.rfind(MARK) + 1
        found = self._view.first_atom(text, end, len(text)) if end > 0 else None
        return found[1] if found is not None and not text[end:found[0]].strip() else None

    def _spans(self, message: dict, trained: str, start: int, w: float) -> list[tuple[int, int, float]]:
        """The trained character spans of a turn: all of it, or all but its reasoning text
        (``data.train_reasoning=false``)."""
        reasoning = (message.get("reasoning_content") or message.get("thinking") or "").strip()
        at = trained.find(reasoning) if reasoning and not self.train_reasoning else -1
        if at < 0:
            return [(start, start + len(trained), w)]
        spans = [(start, start + at, w), (start + at + len(reasoning), start + len(trained), w)]
        return [sp for sp in spans if sp[1] > sp[0]]

    def render(self, row: dict) -> Rendered:
        messages, converted = self.messages_of(row)
        extra = self.row_extra(row)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["_weight"] > 0]
        if self.train_on == "last_assistant":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            targets = [i for i in targets if i == last]
        if not targets:
            raise RowSkip("no trained assistant turn")
        full = self.render_text(messages, index=len(messages) - 1, extra=extra)
        if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            check_rendered(lambda msgs: self.render_text(msgs, extra=extra), messages, self.template_name,
                             self.column)
        shared, alone, why = [], [], set()
        for i in targets:
            prompt = self.render_text(messages[:i], add_generation_prompt=True, index=i - 1, extra=extra)
            trained = self.turn_text(messages, i, prompt, extra)
            if not trained:
                continue
            spans = self._spans(messages[i], trained, len(prompt), messages[i]["_weight"])
            own = Sequence(prompt + trained, [Turn(len(prompt), spans)])
            if full.startswith(prompt + trained):
                shared.append(Turn(len(prompt), spans, standalone=own))
            else:
                alone.append(own)
                why.add("the generation prompt is not a prefix of the conversation" if not full.startswith(prompt)
                        else "the template writes this turn differently when later turns follow")
        if not shared and not alone:
            raise RowSkip("no trained assistant turn")
        sequences = ([Sequence(full, shared)] if shared else []) + alone
        notes = [CONVERTED] if converted else []
        if any(m.get("reasoning_content") or m.get("thinking") for m in messages) and not self._reasoning():
            notes.append(UNWRITTEN_REASONING)
        return Rendered(sequences, expanded=len(alone) if shared else max(0, len(alone) - 1), why="; ".join(sorted(why)),
                        note="; ".join(notes))

    # -- inference direction
    def prompt(self, row: dict) -> str:
        messages, _ = self.messages_of(row, need_assistant=False)
        if messages[-1]["role"] == "assistant":  # the reply to predict is the last message
            messages = messages[:-1]
        return self.render_text(messages, add_generation_prompt=True, extra=self.row_extra(row, default_tools=True))

    def reference(self, row: dict) -> str | None:
        try:
            messages = normalize_messages(row.get(self.column), self.column, need_assistant=False)
        except BadRow:
            return None
        return messages[-1]["content"] if messages[-1]["role"] == "assistant" else None

    def prompt_from_text(self, text: str, history: list[dict] | None = None, tools: list[dict] | None = None) -> str:
        """The prompt for a typed message, with ``tools`` (default: :attr:`tools`) rendered in."""
        messages = list(history or []) + [{"role": "user", "content": text}]
        return self.render_text(messages, add_generation_prompt=True,
                                extra={"tools": tools if tools is not None else self.tools, "kwargs": self.kwargs})

    def prompt_messages(self, row: dict) -> tuple[list[dict], dict]:
        """The messages before the row's last assistant turn as the template is given them, and the
        other arguments of that render (``tools`` and the template kwargs): for checks that call
        ``apply_chat_template`` themselves (``export --verify``)."""
        messages, _ = self.messages_of(row, need_assistant=False)
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        extra = self.row_extra(row, default_tools=True)
        return self.public_messages(messages[:last]), {"tools": extra["tools"], **extra["kwargs"]}

    def stop_ids(self, tokenizer) -> list[int]:
        """The stop tokens of the turn rule (:func:`sftune.data.turns.stop_tokens`) as ids."""
        ids = end_of_turn_ids(tokenizer)
        for t in self.view().stops:
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
        return sorted(ids)
