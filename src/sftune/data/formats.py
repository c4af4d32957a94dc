"""Formats: the prompt contract. One object per run knows how a row becomes text, in both directions.

* **Training**: :meth:`Format.render` turns a row into :class:`Sequence` objects: a text, and for
  each trained completion (a :class:`Turn`) the character offset where its inference prompt ends
  and the trained character spans with their weights. ``sftune.data.tokenize`` tokenizes each text
  once and labels tokens through character offsets.
* **Inference**: :meth:`Format.prompt` (a data row), :meth:`Format.prompt_from_text` (a typed
  message, with chat history), :attr:`Format.add_bos` (the BOS rule), :meth:`Format.stop_ids` and
  :meth:`Format.export_chat_template` are what ``generate``, ``chat``, ``eval`` and ``export`` use.
  :meth:`Format.identity` is saved with a run (as ``data.*`` keys), so the same format, custom
  ones included, is rebuilt for inference by :func:`format_from_identity`.

The formats:

* ``text``: one trained span, the column's text (optionally split at a response template).
* ``prompt_completion``: an untrained prompt and a trained completion, from columns or templates.
* ``messages``: chat turns rendered with the tokenizer's chat template, **turn by turn**: for each
  assistant turn ``i`` the context is ``apply_chat_template(messages[:i], add_generation_prompt=True)``
  and the trained text is what the template writes for turn ``i`` (rendered as the last message)
  after that prompt, up to and including its end-of-turn token. When the whole conversation
  rendered at once starts with that context followed by that turn (a prefix-stable template), the
  turn is trained inside one sequence per conversation; otherwise (templates that strip earlier
  reasoning, end the final turn differently, drop the system prompt, or whose generation prompt is
  not a prefix of the turn) it gets a sequence of its own, rendered exactly as at inference, and the
  data report counts it.

EOS is not text here: prompt/completion and text formats ask for the tokenizer's EOS id to be
appended (trained); chat templates write their own end-of-turn tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape
from transformers.utils.chat_template_utils import render_jinja_template

from sftune.config import DataConfig
from sftune.data.templates import PromptCompletionTemplate, is_template, named_template, parse_fields
from sftune.errors import ConfigError, RowSkip
from sftune.ui import console, is_main_process

# ----------------------------------------------------------------------------- rendered rows


@dataclass
class Turn:
    """One trained completion inside a sequence's text.

    ``context``: the inference prompt is ``text[:context]`` (its token ids must equal the prefix of
    the sequence's ids). ``spans``: trained ``(start, end, weight)`` character ranges. ``eos``: the
    weight of an EOS id appended after the text (``None``: no EOS). ``standalone``: the sequence to
    train this turn in on its own when the shared sequence cannot hold it exactly.
    """

    context: int
    spans: list[tuple[int, int, float]]
    eos: float | None = None
    standalone: "Sequence | None" = None


@dataclass
class Sequence:
    text: str
    turns: list[Turn]


@dataclass
class Rendered:
    """The training sequences of one row. ``expanded``: turns that needed a sequence of their own
    because the chat template is not prefix-stable for them (``why`` says how)."""

    sequences: list[Sequence]
    expanded: int = 0
    why: str = ""
    note: str = ""
    """Something about the row the data report should count (not a skip)."""


@dataclass
class FormattedExample:
    """Text segments of one example, ``(text, weight)`` in order (a weight of 0 or ``False``: not
    trained; ``True`` counts as 1). ``add_eos`` appends the tokenizer's EOS, trained."""

    segments: list[tuple[str, Any]]
    add_eos: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    @property
    def trained_text(self) -> str:
        return "".join(t for t, w in self.segments if w)

    def to_sequence(self) -> Sequence:
        """One sequence; a turn for every trained run of segments, its context where the run starts."""
        text, turns, pos, current = self.text, [], 0, None
        for seg, w in self.segments:
            w = float(w)
            if w and seg:
                if current is None:
                    current = Turn(context=pos, spans=[])
                    turns.append(current)
                current.spans.append((pos, pos + len(seg), w))
            elif seg:
                current = None
            pos += len(seg)
        if self.add_eos:
            last_w = next((float(w) for _, w in reversed(self.segments) if float(w)), 1.0)
            if turns and turns[-1].spans and turns[-1].spans[-1][1] == len(text):
                turns[-1].eos = last_w
            else:
                turns.append(Turn(context=len(text), spans=[], eos=last_w))
        return Sequence(text, turns)


class BadRow(Exception):
    """A malformed row: an error or a counted skip, depending on ``data.on_bad_row``."""

    def __init__(self, message: str, column: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.column, self.hint = message, column, hint


def _string_field(row: dict, column: str, *, optional: bool = False) -> str:
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise BadRow("value is null", column, "fill the value, or set data.on_bad_row=skip to skip such rows")
    if not isinstance(value, str):
        raise BadRow(
            f"expected a string, got {type(value).__name__} {str(value)[:60]!r}",
            column,
            "convert the column to text, or set data.on_bad_row=skip to skip such rows",
        )
    return value


# ----------------------------------------------------------------------------- the contract


class Format:
    """The prompt contract. Subclasses implement :meth:`__call__` (segments; enough for formats
    that are one text per row) or :meth:`render` (several sequences), and the inference side."""

    name = "base"
    columns: list[str] = []
    train_on_prompt = False
    add_bos = True
    """Prefix the tokenizer's BOS (what ``tokenizer(text)`` adds) to training text and prompts.
    Chat templates write their own, so chat formats say ``False``."""

    def __call__(self, row: dict) -> FormattedExample:  # pragma: no cover - interface
        raise NotImplementedError

    def render(self, row: dict) -> Rendered:
        """Training direction: the row's sequences."""
        return Rendered([self(row).to_sequence()])

    # -- inference direction
    def prompt(self, row: dict) -> str:
        """The inference prompt for a data row (only the prompt's columns are needed)."""
        ex = self(row)
        lead = []
        for text, w in ex.segments:
            if w:
                break
            lead.append(text)
        return "".join(lead)

    def reference(self, row: dict) -> str | None:
        """The completion a row expects after :meth:`prompt` (``None``: none)."""
        try:
            ex = self(row)
        except (RowSkip, BadRow):
            return None
        lead = len(self.prompt(row))
        return ex.text[lead:] or None

    def prompt_from_text(self, text: str, history: list[dict] | None = None) -> str:
        """The prompt for a typed message (history: earlier chat turns, chat formats only)."""
        return text

    @property
    def is_chat(self) -> bool:
        return False

    def stop_ids(self, tokenizer) -> list[int]:
        """Token ids that end a generated reply."""
        return sorted(end_of_turn_ids(tokenizer))

    def export_chat_template(self, tokenizer) -> str | None:
        """A Jinja chat template that reproduces this format's prompt (saved with exports)."""
        return getattr(tokenizer, "chat_template", None)

    # -- identity
    def identity(self) -> dict:
        """Data-config values that rebuild this format without seeing the data (saved with a run,
        so generation and evaluation prompt exactly as training did)."""
        return {}

    def config_updates(self) -> dict:  # the name used before the contract had one owner
        return self.identity()

    def cache_key(self) -> str:
        """Extra identity for the tokenization cache (a custom format returns a hash of what defines it)."""
        return ""

    def review(self, report) -> None:
        """Called with each split's :class:`~sftune.data.report.DataReport` after tokenization, so a
        format can warn about what it skipped."""


class TextFormat(Format):
    """Plain text, trained whole; or, with a response template, trained after its last occurrence
    (TRL 0.7's completion-only collator), or after each one up to the next instruction template."""

    name = "text"

    def __init__(self, cfg: DataConfig):
        self.column = cfg.text_column
        self.columns = [self.column]
        self.add_eos = cfg.add_eos
        self.response_template = cfg.response_template
        self.instruction_template = cfg.instruction_template

    def identity(self) -> dict:
        return {"format": "text", "text_column": self.column, "response_template": self.response_template,
                "instruction_template": self.instruction_template}

    def text_of(self, row: dict) -> str:
        if row.get(self.column) is None:
            raise RowSkip("empty or null text")
        return _string_field(row, self.column)

    def __call__(self, row: dict) -> FormattedExample:
        text = self.text_of(row)
        if not text:
            raise RowSkip("empty or null text")
        if self.response_template is None:
            return FormattedExample([(text, True)], add_eos=self.add_eos)
        segments = split_at_response(text, self.response_template, self.instruction_template)
        return FormattedExample(segments, add_eos=self.add_eos and bool(segments[-1][1]))

    def render(self, row: dict) -> Rendered:
        rendered = super().render(row)
        if self.response_template is not None and self.instruction_template is None and \
                rendered.sequences[0].text.count(self.response_template) > 1:
            rendered.note = TEMPLATE_REPEATED
        return rendered

    def prompt(self, row: dict) -> str:
        text = self.text_of(row)
        if self.response_template is None:
            return text
        cut = text.rfind(self.response_template)
        return text[:cut + len(self.response_template)] if cut >= 0 else text

    def reference(self, row: dict) -> str | None:
        if self.response_template is None:
            return None
        return super().reference(row)

    def prompt_from_text(self, text: str, history: list[dict] | None = None) -> str:
        if self.response_template and self.response_template not in text:
            return (self.instruction_template + " " if self.instruction_template else "") + text + \
                "\n" + self.response_template
        return text

    def review(self, report) -> None:
        n = report.skipped.get(NOT_FOUND, 0)
        if n:
            if is_main_process():
                rows = ", ".join(map(str, report.skipped_rows[NOT_FOUND])) + (", …" if n > 5 else "")
                console.print(f"[yellow]warning:[/] {n:,} of {report.rows_used:,} texts in {escape(report.split)} do "
                              f"not contain the response template {escape(repr(self.response_template))} and were "
                              f"skipped, since the loss goes after it (rows {rows}). Check that the text writes the "
                              "template exactly, spaces and newlines included.")
        n = report.notes.get(TEMPLATE_REPEATED, 0)
        if n:
            if is_main_process():
                rows = ", ".join(map(str, report.note_rows[TEMPLATE_REPEATED])) + (", …" if n > 5 else "")
                console.print(f"[yellow]note:[/] in {n:,} texts the response template "
                              f"{escape(repr(self.response_template))} occurs more than once; the loss starts after "
                              f"the last occurrence, as TRL's collator does (rows {rows}).")


NOT_FOUND = "response template not found"
EMPTY = "empty or null completion"
TEMPLATE_REPEATED = "response template occurs more than once"


def split_at_response(text: str, response: str, instruction: str | None = None) -> list[tuple[str, bool]]:
    """``(text, trained)`` segments: trained after the *last* ``response`` template (TRL 0.7), or,
    with an ``instruction`` template (multi-turn), after every response up to the next instruction.

    Raises :class:`RowSkip` when the template is missing or nothing non-blank follows it.
    """
    if instruction is None:
        start = text.rfind(response)
        if start < 0:
            raise RowSkip(NOT_FOUND)
        cut = start + len(response)
        segments = [(text[:cut], False), (text[cut:], True)]
    else:
        start = text.find(response)
        if start < 0:
            raise RowSkip(NOT_FOUND)
        segments, pos = [], 0
        while start >= 0:
            cut = start + len(response)
            end = text.find(instruction, cut)
            end = len(text) if end < 0 else end
            segments += [(text[pos:cut], False), (text[cut:end], True)]
            pos, start = end, text.find(response, end)
        segments.append((text[pos:], False))
    if not "".join(t for t, trained in segments if trained).strip():
        raise RowSkip(EMPTY)
    return [(t, trained) for t, trained in segments if t]


class PromptCompletionFormat(Format):
    name = "prompt_completion"

    def __init__(self, cfg: DataConfig):
        if cfg.template:
            if cfg.prompt or cfg.completion:
                raise ConfigError("set either data.template or data.prompt/data.completion, not both.")
            self.template = named_template(cfg.template)
        else:
            if not cfg.prompt or not cfg.completion:
                raise ConfigError(
                    "the prompt_completion format needs data.template (qa, alpaca, alpaca_h4) or both "
                    "data.prompt and data.completion (column names or templates such as "
                    "'### Question: {instruction}\\n ### Answer:')."
                )
            prompt = cfg.prompt if is_template(cfg.prompt) else "{" + cfg.prompt + "}"
            completion = cfg.completion if is_template(cfg.completion) else "{" + cfg.completion + "}"
            parse_fields(prompt, "data.prompt")
            parse_fields(completion, "data.completion")
            self.template = PromptCompletionTemplate(prompt=prompt, completion=completion)
        self.columns = [c for c in self.template.fields if c not in self.template.optional_fields]
        self.completion_columns = self.template.completion_fields
        self.prompt_columns = [c for c in self.template.fields if c not in self.completion_columns]
        self.train_on_prompt = cfg.train_on_prompt
        self.add_eos = cfg.add_eos
        self._named = cfg.template

    def identity(self) -> dict:
        base = {"format": "prompt_completion", "train_on_prompt": self.train_on_prompt, "add_eos": self.add_eos}
        if self._named:
            return {**base, "template": self._named, "prompt": None, "completion": None}
        return {**base, "template": None, "prompt": self.template.prompt, "completion": self.template.completion}

    def prompt_from_text(self, text: str, history: list[dict] | None = None) -> str:
        """A prompt whose first prompt field is ``text`` and whose other fields are empty."""
        fields = self.prompt_columns or self.template.fields
        return self.prompt({f: (text if i == 0 else "") for i, f in enumerate(fields)})

    def values(self, row: dict) -> dict[str, str]:
        values = {}
        for col in self.template.fields:
            if col in self.completion_columns and (row.get(col) is None or row.get(col) == ""):
                raise RowSkip("empty or null completion")
            values[col] = _string_field(row, col, optional=col in self.template.optional_fields)
        return values

    def prompt(self, row: dict) -> str:
        """The prompt alone, as given to the model at inference (completion columns not needed)."""
        values = {}
        for c in self.template.fields:
            if c in self.completion_columns:
                values[c] = ""
            elif row.get(c) is None and c not in self.template.optional_fields:
                raise BadRow(f"no value for the prompt column {c!r}", c,
                             f"each row needs the training prompt's columns: {', '.join(self.prompt_columns)}")
            else:
                values[c] = _string_field(row, c, optional=True)
        return self.template.render(values)[0]

    def reference(self, row: dict) -> str | None:
        if any(row.get(c) in (None, "") for c in self.completion_columns):
            return None
        return self.template.render(self.values(row))[1]

    def export_chat_template(self, tokenizer) -> str | None:
        """A Jinja chat template that renders the last user message into the training prompt."""
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        if not self.template.fields:
            return None
        before, _, after = self.prompt_from_text("\x00").partition("\x00")

        def lit(s: str) -> str:
            return json.dumps(s)  # a JSON string is a valid Jinja string literal

        return ("{% set ns = namespace(content='') %}{% for m in messages %}{% if m['role'] == 'user' %}"
                "{% set ns.content = m['content'] %}{% endif %}{% endfor %}"
                "{{ " + lit(before) + " + ns.content + " + lit(after) + " }}")

    def __call__(self, row: dict) -> FormattedExample:
        prompt, completion = self.template.render(self.values(row))
        if not completion.strip():
            raise RowSkip("empty or null completion")
        return FormattedExample(
            [(prompt, self.train_on_prompt), (completion, True)],
            add_eos=self.add_eos,
            meta={"prompt": prompt, "completion": completion},
        )


# ----------------------------------------------------------------------------- chat

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
        best = None
        for s in self._specials:
            at = text.find(s, start)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) > best[1])):
                best = (at, len(s))
        return best[0] + best[1] if best else len(text)

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
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return self.render_text(messages[:last], add_generation_prompt=True)

    def reference(self, row: dict) -> str | None:
        try:
            messages = normalize_messages(row.get(self.column), self.column, need_assistant=False)
        except BadRow:
            return None
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return None if last is None else messages[last]["content"]

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
        except (BadRow, Exception):  # noqa: BLE001 - a template that cannot render a probe: keep the defaults
            pass
        return sorted(ids)


class RawFormat(Format):
    """A model without an sftune config and without a chat template: prompts are the raw text."""

    name = "raw"

    def __call__(self, row: dict) -> FormattedExample:
        text = row.get("prompt") or row.get("text") or row.get("instruction")
        if not isinstance(text, str):
            raise BadRow("cannot build a prompt from this row: give rows a 'prompt' column", "prompt")
        return FormattedExample([(text, False)])


# ----------------------------------------------------------------------------- choosing


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end a trained span: EOS, and the special tokens chat templates end turns with."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>", "<|return|>",
                "<|eom_id|>", "<｜end▁of▁sentence｜>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
            ids.add(tid)
    return ids


def find_messages_column(columns: list[str], cfg: DataConfig) -> str | None:
    if cfg.messages_column:
        return cfg.messages_column
    for c in ("messages", "conversations", "conversation"):
        if c in columns:
            return c
    return None


def choose_format(cfg: DataConfig, columns: list[str], tokenizer) -> Format:
    """Build the configured format (resolving ``auto`` from the columns)."""
    kind = cfg.format
    msg_col = find_messages_column(columns, cfg)
    if kind == "auto":
        if cfg.template or cfg.prompt or cfg.completion:
            kind = "prompt_completion"
        elif cfg.response_template:
            kind = "text"
        elif msg_col and msg_col in columns:
            kind = "messages"
        elif "prompt" in columns and "completion" in columns:
            kind = "prompt_completion"
            cfg = cfg.model_copy(update={"prompt": "prompt", "completion": "completion"})
        else:
            kind = "text"
    if kind == "text":
        return TextFormat(cfg)
    if kind == "prompt_completion":
        if not (cfg.template or cfg.prompt or cfg.completion) and "prompt" in columns and "completion" in columns:
            cfg = cfg.model_copy(update={"prompt": "prompt", "completion": "completion"})
        return PromptCompletionFormat(cfg)
    return MessagesFormat(cfg, tokenizer, msg_col or "messages")


def format_from_identity(cfg: DataConfig | None, tokenizer) -> Format:
    """The format a run was trained with, rebuilt from its saved ``data`` config; for a plain model,
    its chat template, or the raw text."""
    if cfg is not None and (cfg.format != "auto" or cfg.template or cfg.prompt or cfg.completion
                            or cfg.response_template):
        try:
            return choose_format(cfg, [], tokenizer)
        except ConfigError:
            pass
    if getattr(tokenizer, "chat_template", None):
        return MessagesFormat(cfg or DataConfig(), tokenizer, (cfg.messages_column if cfg else None) or "messages")
    return RawFormat()
