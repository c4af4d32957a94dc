"""Chat data: conversations rendered with a chat template, turn by turn.

For each assistant turn ``i`` the context is ``apply_chat_template(messages[:i],
add_generation_prompt=True)`` and the trained text is what the template writes for turn ``i``
(rendered as the last message) after that prompt, up to and including its end-of-turn token. When
the whole conversation rendered at once starts with that context followed by that turn (a
prefix-stable template), the turn is trained inside one sequence per conversation; otherwise
(templates that strip earlier reasoning, end the final turn differently, drop the system prompt, or
whose generation prompt is not a prefix of the turn) it gets a sequence of its own, rendered exactly
as at inference, and the data report counts it.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from sftune.config import DataConfig
from sftune.data.contract import BadRow, Format, Rendered, Sequence, Turn, end_of_turn_ids
from sftune.errors import ConfigError, RowSkip

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
_PASS_THROUGH = ("reasoning_content", "thinking", "tool_calls", "tool_call_id", "name")


def normalize_messages(value: Any, column: str, *, need_assistant: bool = True) -> list[dict]:
    """``[{role, content}]`` or ShareGPT ``[{from, value}]`` -> ``[{role, content, ...}]``.

    Kept per message: ``reasoning_content``/``thinking``, tool fields, and sftune's ``train``
    (bool) and ``weight`` (float >= 0), which are validated here and never passed to the template.
    """
    if not isinstance(value, list) or not value:
        raise BadRow("expected a non-empty list of messages", column)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"message {i} is {type(m).__name__}, expected an object with role and content", column)
        if "role" in m and m.get("role") is not None:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = _SHAREGPT_ROLES.get(str(m.get("from")).lower(), m.get("from")), m.get("value")
        else:
            raise BadRow(f"message {i} has neither 'role' nor 'from'", column)
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRow(f"message {i} has the unknown role {role!r} (use system, user, assistant or tool)", column)
        if content is None and role == "assistant" and (m.get("tool_calls") or m.get("reasoning_content")):
            content = ""
        if not isinstance(content, str):
            raise BadRow(f"message {i} content is {type(content).__name__}, expected a string", column)
        msg = {"role": role, "content": content}
        for key in _PASS_THROUGH:
            if m.get(key) is not None:
                msg[key] = m[key]
        train, weight = m.get("train", True), m.get("weight", 1.0)
        if not isinstance(train, bool):
            raise BadRow(f"message {i} has train={train!r}; use true or false", column)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise BadRow(f"message {i} has weight={weight!r}; use a finite number >= 0", column)
        msg["_weight"] = float(weight) if train else 0.0
        out.append(msg)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise BadRow("the conversation has no assistant turn, so nothing would be trained", column,
                     "add an assistant reply, or set data.on_bad_row=skip to skip such rows")
    return out


def _public(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("_")} for m in messages]


class MessagesFormat(Format):
    """Chat data rendered with a chat template, turn by turn (see the module docstring)."""

    name = "messages"
    add_bos = False

    def __init__(self, cfg: DataConfig, tokenizer, column: str):
        self.column = column
        self.columns = [column]
        self.tokenizer = tokenizer
        self.train_on = cfg.train_on
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the messages format needs a chat template, and this tokenizer has none. "
                "Set data.chat_template=chatml (adds <|im_start|>/<|im_end|>), data.chat_template=simple "
                "(uses the EOS token), or a Jinja template."
            )
        added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
        specials = set(added) | {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        self._specials = sorted((s for s in specials if s), key=len, reverse=True)
        ends = {tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)}
        self._end_tokens = sorted((s for s in ends if isinstance(s, str) and s in specials), key=len, reverse=True)

    @property
    def is_chat(self) -> bool:
        return True

    def identity(self) -> dict:
        return {"format": "messages", "messages_column": self.column, "train_on": self.train_on}

    def cache_key(self) -> str:
        return hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()[:16]

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False, *, index: int | None = None) -> str:
        try:
            if not messages:  # an assistant-first conversation: the template's own text for "no history"
                rendered, _ = render_jinja_template(
                    conversations=[[]], chat_template=self.tokenizer.get_chat_template(),
                    add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map)
                return rendered[0]
            return self.tokenizer.apply_chat_template(_public(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() in templates
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            at = f" (rendering messages 0..{index})" if index is not None else ""
            raise BadRow(f"the chat template failed to render this conversation{at}: {first}", self.column,
                         "fix the conversation, or set data.on_bad_row=skip to skip such rows") from None

    # -- the turn as the template writes it
    def _end_of_turn(self, text: str, content: str) -> int:
        """Where the trained text ends: after the first special token that follows the message
        content (its end-of-turn), or the whole text when no special token follows."""
        start = 0
        for probe in (content, content.strip(), content.strip()[-24:]):
            if probe:
                at = text.rfind(probe)
                if at >= 0:
                    start = at + len(probe)
                    break
        # known end-of-turn tokens first (EOS, <|im_end|>, <|eot_id|>, ...), so a special token the
        # template writes inside a reply (a tool-call tag) does not end it; then any special token
        for candidates in (self._end_tokens, self._specials):
            best = None
            for s in candidates:
                at = text.find(s, start)
                if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) > best[1])):
                    best = (at, len(s))
            if best:
                return best[0] + best[1]
        return len(text)

    def turn_text(self, messages: list[dict], i: int, prompt: str) -> str:
        """What the template writes for assistant turn ``i`` after the inference ``prompt``, up to
        and including its end-of-turn token."""
        upto = self.render_text(messages[: i + 1], index=i)
        if upto.startswith(prompt):
            raw = upto[len(prompt):]
        else:
            raw = self._turn_text_unaligned(messages, i, prompt, upto)
        content = messages[i]["content"]
        return raw[: self._end_of_turn(raw, content)]

    def _turn_text_unaligned(self, messages: list[dict], i: int, prompt: str, upto: str) -> str:
        """The generation prompt is not a prefix of the rendered turn (a different system prompt,
        a ``<think>`` the generation prompt adds): align on the turn's own header instead."""
        sentinel = "\u2063sftune\u2063"
        probe = self.render_text(messages[:i] + [{"role": "assistant", "content": sentinel}], index=i)
        s = probe.find(sentinel)
        prev = next((m["content"] for m in reversed(messages[:i]) if m["content"].strip()), "")
        if s < 0 or probe[:s] != upto[:s]:
            raise BadRow(f"message {i}: cannot find where the chat template writes this assistant turn", self.column,
                         "use a template that writes the message content verbatim, or set data.on_bad_row=skip")
        header = probe[:s]
        e = header.rfind(prev) if prev else 0  # no earlier content: align from the start
        p = prompt.rfind(prev) if prev else 0
        if e < 0 or p < 0:
            raise BadRow(f"message {i}: cannot align the generation prompt with the rendered turn", self.column,
                         "set data.on_bad_row=skip to skip such rows")
        between, prompt_tail = header[e + len(prev):], prompt[p + len(prev):]
        body = upto[s:]
        if between.startswith(prompt_tail):  # the template's header goes on after the generation prompt
            return between[len(prompt_tail):] + body
        if prompt_tail.startswith(between):  # the generation prompt adds text the turn does not repeat
            extra = prompt_tail[len(between):]
            return body[len(extra):] if body.startswith(extra) else body
        return body  # headers that differ otherwise: the model is asked for the content and its end

    def render(self, row: dict) -> Rendered:
        messages = normalize_messages(row.get(self.column), self.column)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m["_weight"] > 0]
        if self.train_on == "last_assistant":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            targets = [i for i in targets if i == last]
        if not targets:
            raise RowSkip("no trained assistant turn")
        full = self.render_text(messages, index=len(messages) - 1)
        shared, alone, why = [], [], set()
        for i in targets:
            prompt = self.render_text(messages[:i], add_generation_prompt=True, index=i - 1)
            trained = self.turn_text(messages, i, prompt)
            if not trained:
                continue
            w = messages[i]["_weight"]
            own = Sequence(prompt + trained, [Turn(len(prompt), [(len(prompt), len(prompt) + len(trained), w)])])
            if full.startswith(prompt + trained):
                shared.append(Turn(len(prompt), [(len(prompt), len(prompt) + len(trained), w)], standalone=own))
            else:
                alone.append(own)
                why.add("the generation prompt is not a prefix of the conversation" if not full.startswith(prompt)
                        else "the template writes this turn differently when later turns follow")
        if not shared and not alone:
            raise RowSkip("no trained assistant turn")
        sequences = ([Sequence(full, shared)] if shared else []) + alone
        return Rendered(sequences, expanded=len(alone) if shared else max(0, len(alone) - 1), why="; ".join(sorted(why)))

    # -- inference direction
    def prompt(self, row: dict) -> str:
        messages = normalize_messages(row.get(self.column), self.column, need_assistant=False)
        if messages[-1]["role"] == "assistant":  # the reply to predict is the last message
            messages = messages[:-1]
        return self.render_text(messages, add_generation_prompt=True)

    def reference(self, row: dict) -> str | None:
        try:
            messages = normalize_messages(row.get(self.column), self.column, need_assistant=False)
        except BadRow:
            return None
        return messages[-1]["content"] if messages[-1]["role"] == "assistant" else None

    def prompt_from_text(self, text: str, history: list[dict] | None = None) -> str:
        messages = list(history or []) + [{"role": "user", "content": text}]
        return self.render_text(messages, add_generation_prompt=True)

    def stop_ids(self, tokenizer) -> list[int]:
        """EOS, the usual end-of-turn tokens, and the one this template ends a reply with."""
        ids = end_of_turn_ids(tokenizer)
        try:
            msgs = [{"role": "user", "content": "hi", "_weight": 1.0}, {"role": "assistant", "content": "hello", "_weight": 1.0}]
            prompt = self.render_text(msgs[:1], add_generation_prompt=True)
            turn = self.turn_text(msgs, 1, prompt)
            last = max((s for s in self._specials if turn.endswith(s)), key=len, default=None)
            if last is not None:
                tid = tokenizer.convert_tokens_to_ids(last)
                if isinstance(tid, int) and tid >= 0:
                    ids.add(tid)
        except Exception:  # noqa: BLE001 - a template that cannot render a probe: keep the defaults
            pass
        return sorted(ids)


