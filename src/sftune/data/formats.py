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
* ``messages``: chat turns rendered with the tokenizer's chat template, turn by turn
  (:mod:`sftune.data.chat`).

The types a format renders into, and the :class:`Format` base, are in :mod:`sftune.data.contract`.

EOS is not text here: prompt/completion and text formats ask for the tokenizer's EOS id to be
appended (trained); chat templates write their own end-of-turn tokens.
"""

from __future__ import annotations

import json
import uuid
from typing import Callable

import datasets
from rich.markup import escape

from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat, normalize_messages
from sftune.data.contract import (BadRow, Format, FormattedExample, Rendered, Sequence, Turn,  # noqa: F401 (the API)
                                  string_field, end_of_turn_ids)
from sftune.data.templates import PromptCompletionTemplate, is_template, named_template, parse_fields
from sftune.data.templates import NAMED_TEMPLATES
from sftune.errors import ConfigError, DataError, RowSkip
from sftune.console import console, is_main_process

__all__ = ["BadRow", "Format", "FormattedExample", "MessagesFormat", "PromptCompletionFormat", "RawFormat", "Rendered",
           "Sequence", "TextFormat", "Turn", "choose_format", "end_of_turn_ids", "format_from_identity",
           "normalize_messages", "split_at_response", "FunctionFormat", "named_equivalent"]


# ----------------------------------------------------------------------------- text and prompt/completion


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
        return string_field(row, self.column)

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
        if not is_main_process():
            return
        template = escape(repr(self.response_template))
        n = report.skipped.get(NOT_FOUND, 0)
        if n:
            console.print(f"[yellow]warning:[/] {n:,} of {report.rows_used:,} texts in {escape(report.split)} do not "
                          f"contain the response template {template} and were skipped, since the loss goes after it "
                          f"(rows {_some(report.skipped_rows[NOT_FOUND], n)}). Check that the text writes the "
                          "template exactly, spaces and newlines included.")
        n = report.notes.get(TEMPLATE_REPEATED, 0)
        if n:
            console.print(f"[yellow]note:[/] in {n:,} texts the response template {template} occurs more than once; "
                          "the loss starts after the last occurrence, as TRL's collator does "
                          f"(rows {_some(report.note_rows[TEMPLATE_REPEATED], n)}).")


def _some(rows: list[int], n: int) -> str:
    """The first row numbers the report keeps, and an ellipsis when there are more."""
    return ", ".join(map(str, rows)) + (", …" if n > len(rows) else "")


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
        self.fields, self.optional = self.template.fields, self.template.optional_fields  # parsed once
        self.columns = [c for c in self.fields if c not in self.optional]
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
        for col in self.fields:
            if col in self.completion_columns and (row.get(col) is None or row.get(col) == ""):
                raise RowSkip("empty or null completion")
            values[col] = string_field(row, col, optional=col in self.optional)
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
                values[c] = string_field(row, c, optional=True)
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

        # Chat-template consumers (pipelines, TRL) tokenize the rendered text with no special tokens
        # added, so the format's BOS rule is written into the template; a SentencePiece tokenizer
        # that marks only the start of the text with "▁" needs a space after the BOS to match.
        bos = ""
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        if self.add_bos and tokenizer.bos_token_id is not None and \
                tokenizer("a", add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id] + plain:
            probe = self.prompt_from_text("hello")
            want = [tokenizer.bos_token_id] + tokenizer(probe, add_special_tokens=False)["input_ids"]
            space = tokenizer(tokenizer.bos_token + probe, add_special_tokens=False)["input_ids"] != want and \
                tokenizer(tokenizer.bos_token + " " + probe, add_special_tokens=False)["input_ids"] == want
            bos = "{{ bos_token }}" + (" " if space else "")
        return (bos + "{% set ns = namespace(content='') %}{% for m in messages %}{% if m['role'] == 'user' %}"
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


class FunctionFormat(TextFormat):
    """The text of TRL's ``formatting_func``.

    TRL 0.7 called it with a batch (a dict of lists) and expected a list of texts; with
    ``packing=True`` it called it with one row and expected a string. Both kinds work: the row is
    passed as a batch of one, and a function that fails on that or returns a string is called with
    the plain row instead (the kind is decided on the first row).
    """

    name = "formatting_func"

    def __init__(self, func: Callable, response_template: str | None = None, instruction_template: str | None = None,
                 add_eos: bool = True):
        super().__init__(DataConfig(format="text", text_column="text", response_template=response_template,
                                    instruction_template=instruction_template, add_eos=add_eos))
        self.columns = []
        self.func = func
        self.batched: bool | None = None
        self.named: str | None = None
        """The built-in template that gives the same texts (see :func:`named_equivalent`), if any."""

    def identity(self) -> dict:
        """The function itself cannot be saved: a run reloads with the equivalent built-in template,
        or as text split at the response template."""
        if self.named:
            return {"format": "prompt_completion", "template": self.named, "prompt": None, "completion": None,
                    "train_on_prompt": self.response_template is None}
        return super().identity()

    def _failure(self, error: Exception, kind: str, row: dict) -> DataError:
        return DataError(f"formatting_func raised {type(error).__name__}: {error} (called with {kind})",
                         hint=f"check the columns it reads; the rows have {sorted(row)}")

    def text_of(self, row: dict) -> str:
        row = {k: v for k, v in row.items() if k != "__row__"}
        batch_error = None
        if self.batched is not False:
            try:
                out = self.func({k: [v] for k, v in row.items()})
            except Exception as e:
                if self.batched:
                    raise self._failure(e, "a batch", row) from None
                batch_error, out = e, None
            if isinstance(out, list):
                if len(out) != 1 or not isinstance(out[0], str):
                    raise DataError(f"formatting_func returned {out!r:.80} for a batch of one row",
                                    hint="return one string per row of the batch: a list of strings")
                self.batched = True
                return out[0]
            if self.batched:
                raise DataError(f"formatting_func returned {type(out).__name__} for a batch, and a list for "
                                "earlier rows", hint="return a list of strings, one per row of the batch")
        try:
            out = self.func(row)
        except Exception as e:
            raise (self._failure(batch_error, "a batch of one row, as TRL did", row) if batch_error
                   else self._failure(e, "one row", row)) from None
        if not isinstance(out, str):
            raise DataError(f"formatting_func returned {type(out).__name__}",
                            hint="return a list of strings for a batch (a dict of lists), or a string for one row")
        self.batched = False
        return out

    def cache_key(self) -> str:
        from datasets.fingerprint import Hasher

        try:
            return Hasher.hash((self.func, self.response_template, self.instruction_template))
        except Exception:  # a function that cannot be pickled: never reuse a cached tokenization
            return uuid.uuid4().hex


def named_equivalent(fmt: FunctionFormat, ds: datasets.Dataset, n: int = 20) -> str | None:
    """The built-in ``data.template`` that gives the same text and split on the first rows, if any."""
    rows = [{k: v for k, v in r.items() if k != "__row__"} for r in ds.select(range(min(n, len(ds))))]
    try:
        examples = [(r, fmt(r)) for r in rows]
    except (RowSkip, DataError):
        return None
    for name, tpl in NAMED_TEMPLATES.items():
        if not all(f in ds.column_names for f in tpl.fields if f not in tpl.optional_fields):
            continue
        ok = True
        for row, ex in examples:
            prompt, completion = tpl.render({f: row.get(f) or "" for f in tpl.fields})
            split = fmt.response_template is None or ex.segments[0][0] == prompt
            ok = ok and ex.text == prompt + completion and split
        if ok:
            return name
    return None


class RawFormat(Format):
    """A model without an sftune config and without a chat template: prompts are the raw text."""

    name = "raw"

    def __call__(self, row: dict) -> FormattedExample:
        text = row.get("prompt") or row.get("text") or row.get("instruction")
        if not isinstance(text, str):
            raise BadRow("cannot build a prompt from this row: give rows a 'prompt' column", "prompt")
        return FormattedExample([(text, False)])


# ----------------------------------------------------------------------------- choosing


def find_messages_column(columns: list[str], cfg: DataConfig) -> str | None:
    if cfg.messages_column:
        return cfg.messages_column
    for c in ("messages", "conversations", "conversation"):
        if c in columns:
            return c
    return None


def find_tools_column(columns: list[str], cfg: DataConfig) -> str | None:
    """``data.tools_column``, or a ``tools`` column; a configured column the data lacks is an error."""
    if cfg.tools_column:
        if columns and cfg.tools_column not in columns:
            import difflib

            match = difflib.get_close_matches(cfg.tools_column, columns, n=1)
            raise ConfigError(f"data.tools_column is '{cfg.tools_column}', which is not a column of the data "
                              f"(the columns are {columns}" + (f"; did you mean '{match[0]}'?)" if match else ")"))
        return cfg.tools_column
    return "tools" if "tools" in columns else None


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
        elif "input_ids" in columns and cfg.text_column not in columns:  # rows already tokenized (TRL's rule)
            from sftune.data.pretokenized import PretokenizedFormat

            return PretokenizedFormat(completion_only=True)
        else:
            kind = "text"
    if kind == "text":
        return TextFormat(cfg)
    if kind == "prompt_completion":
        if not (cfg.template or cfg.prompt or cfg.completion) and "prompt" in columns and "completion" in columns:
            cfg = cfg.model_copy(update={"prompt": "prompt", "completion": "completion"})
        return PromptCompletionFormat(cfg)
    vision = getattr(tokenizer, "sftune_vision_format", None)  # an image-text-to-text model (sftune.vision_model)
    if vision is not None:
        return vision(cfg, tokenizer.sftune_processor, msg_col or "messages", find_tools_column(columns, cfg))
    return MessagesFormat(cfg, tokenizer, msg_col or "messages", find_tools_column(columns, cfg))


def format_from_identity(cfg: DataConfig | None, tokenizer) -> Format:
    """The format a run was trained with, rebuilt from its saved ``data`` config; for a plain model,
    its chat template, or the raw text."""
    if cfg is not None and (cfg.format != "auto" or cfg.template or cfg.prompt or cfg.completion
                            or cfg.response_template):
        try:
            return choose_format(cfg, [], tokenizer)
        except ConfigError:
            pass
    column = (cfg.messages_column if cfg else None) or "messages"
    if getattr(tokenizer, "sftune_processor", None) is not None:  # an image-text-to-text model (sftune.data.vision)
        return tokenizer.sftune_vision_format(cfg or DataConfig(), tokenizer.sftune_processor, column)
    if getattr(tokenizer, "chat_template", None):
        return MessagesFormat(cfg or DataConfig(), tokenizer, column)
    return RawFormat()
