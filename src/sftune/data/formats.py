"""Formats: one source row -> a list of text segments, each marked trained or not.

This is the stage where the loss mask is decided, on the string level and by construction:

* ``text``: one trained segment, the column's text.
* ``prompt_completion``: an untrained prompt and a trained completion (both trained with
  ``train_on_prompt``), from columns or templates.
* ``messages``: chat turns rendered with a chat template. Assistant spans are found by rendering
  the conversation prefix by prefix, so it works with any template, with or without
  ``{% generation %}`` markers.

EOS is not text here: the tokenizer stage appends its id (see ``FormattedExample.add_eos``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftune.config import DataConfig
from sftune.data.templates import (
    PromptCompletionTemplate,
    is_template,
    named_template,
    parse_fields,
)
from sftune.errors import ConfigError, DataError, RowSkip


@dataclass
class FormattedExample:
    """Text segments of one example. ``segments`` are ``(text, trained)`` pairs in order."""

    segments: list[tuple[str, bool]]
    add_eos: bool = False
    """Append the tokenizer's EOS (trained) after the last segment."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    @property
    def trained_text(self) -> str:
        return "".join(t for t, trained in self.segments if trained)


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


class Format:
    """Base class: ``columns`` are the columns a row must have; ``__call__`` formats a row."""

    name = "base"
    columns: list[str] = []
    train_on_prompt = False

    def __call__(self, row: dict) -> FormattedExample:  # pragma: no cover - interface
        raise NotImplementedError

    def cache_key(self) -> str:
        """Extra identity for the tokenization cache. Built-in formats are fully described by the data
        config; a custom format (a user function, say) returns a hash of what defines it."""
        return ""

    def review(self, report) -> None:
        """Called with each split's :class:`~sftune.data.report.DataReport` after tokenization, so a
        custom format can warn about what it skipped. Built-in formats leave that to the report."""

    def config_updates(self) -> dict:
        """Data-config values that rebuild this format without seeing the data (saved with a run,
        so generation and evaluation prompt exactly as training did)."""
        return {}


class TextFormat(Format):
    name = "text"

    def __init__(self, cfg: DataConfig):
        self.column = cfg.text_column
        self.columns = [self.column]
        self.add_eos = cfg.add_eos

    def config_updates(self) -> dict:
        return {"format": "text", "text_column": self.column}

    def __call__(self, row: dict) -> FormattedExample:
        if row.get(self.column) is None:
            raise RowSkip("empty or null text")
        text = _string_field(row, self.column)
        if not text:
            raise RowSkip("empty or null text")
        return FormattedExample([(text, True)], add_eos=self.add_eos)


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
        self.train_on_prompt = cfg.train_on_prompt
        self.add_eos = cfg.add_eos
        self._named = cfg.template

    def config_updates(self) -> dict:
        if self._named:
            return {"format": "prompt_completion", "template": self._named}
        return {"format": "prompt_completion", "prompt": self.template.prompt, "completion": self.template.completion}

    def prompt_from_text(self, text: str) -> str:
        """A prompt whose first field is ``text`` and whose other fields are empty."""
        fields = self.template.fields
        return self.prompt({f: (text if i == 0 else "") for i, f in enumerate(fields)})

    def values(self, row: dict) -> dict[str, str]:
        values = {}
        for col in self.template.fields:
            if col in self.completion_columns and (row.get(col) is None or row.get(col) == ""):
                raise RowSkip("empty or null completion")
            values[col] = _string_field(row, col, optional=col in self.template.optional_fields)
        return values

    def prompt(self, row: dict) -> str:
        """The prompt alone, as given to the model at inference."""
        values = {c: _string_field(row, c, optional=True) for c in self.template.fields}
        return self.template.render(values)[0]

    def __call__(self, row: dict) -> FormattedExample:
        prompt, completion = self.template.render(self.values(row))
        if not completion.strip():
            raise RowSkip("empty or null completion")
        return FormattedExample(
            [(prompt, self.train_on_prompt), (completion, True)],
            add_eos=self.add_eos,
            meta={"prompt": prompt, "completion": completion},
        )


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}


def normalize_messages(value: Any, column: str) -> list[dict[str, str]]:
    """``[{role, content}]`` or ShareGPT ``[{from, value}]`` -> ``[{role, content}]``."""
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
        if not isinstance(content, str):
            raise BadRow(f"message {i} content is {type(content).__name__}, expected a string", column)
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow("the conversation has no assistant turn, so nothing would be trained", column,
                     "add an assistant reply, or set data.on_bad_row=skip to skip such rows")
    return out


class MessagesFormat(Format):
    """Chat data rendered with a chat template; loss on every assistant turn and nothing else."""

    name = "messages"

    def __init__(self, cfg: DataConfig, tokenizer, column: str):
        self.column = column
        self.columns = [column]
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the messages format needs a chat template, and this tokenizer has none. "
                "Set data.chat_template=chatml (adds <|im_start|>/<|im_end|>), data.chat_template=simple "
                "(uses the EOS token), or a Jinja template."
            )
        specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
        self._specials = sorted(set(specials), key=len, reverse=True)

    def config_updates(self) -> dict:
        return {"format": "messages", "messages_column": self.column}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja errors, raise_exception() in templates
            raise BadRow(f"the chat template failed to render this conversation: {e}", self.column) from None

    def _split_trailing(self, span: str) -> tuple[str, str]:
        """Move whitespace after a final special token (``<|im_end|>\\n``) out of the trained span."""
        stripped = span.rstrip()
        if stripped != span and any(stripped.endswith(s) for s in self._specials):
            return stripped, span[len(stripped):]
        return span, ""

    def __call__(self, row: dict) -> FormattedExample:
        messages = normalize_messages(row.get(self.column), self.column)
        full = self.render(messages)
        segments: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
                raise DataError(
                    f"the chat template renders earlier turns differently once later turns are added "
                    f"(at message {i}), so assistant spans cannot be derived by prefix rendering",
                    column=self.column,
                    hint="use a template that renders each turn independently (data.chat_template=chatml), "
                    "or one whose history rendering is stable",
                )
            trained, rest = self._split_trailing(upto[len(before):])
            if not trained:
                continue
            segments.append((full[pos:len(before)], False))
            segments.append((trained, True))
            segments.append((rest, False))
            pos = len(upto)
        segments.append((full[pos:], False))
        segments = [(t, tr) for t, tr in segments if t]
        return FormattedExample(segments, add_eos=False, meta={"messages": messages})


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
