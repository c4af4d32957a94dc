"""The prompt contract's types: what a format renders a row into, and the :class:`Format` base.

A format (``sftune.data.formats``, ``sftune.data.chat``) is the one owner of how a row becomes
text, in both directions: :meth:`Format.render` for training (sequences with trained character
spans and the inference contexts), and ``prompt`` / ``prompt_from_text`` / ``add_bos`` /
``stop_ids`` / ``export_chat_template`` for inference, with :meth:`Format.identity` saved with a
run so the same format is rebuilt for generate, chat, eval and export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftune.errors import RowSkip

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


def string_field(row: dict, column: str, *, optional: bool = False) -> str:
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

    def cache_key(self) -> str:
        """Extra identity for the tokenization cache (a custom format returns a hash of what defines it)."""
        return ""

    def review(self, report) -> None:
        """Called with each split's :class:`~sftune.data.report.DataReport` after tokenization, so a
        format can warn about what it skipped."""


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


