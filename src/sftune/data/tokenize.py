"""Tokenize: formatted segments -> ``input_ids`` and ``labels``, by construction.

Each segment is tokenized on its own and the ids are concatenated; a segment's tokens get labels
equal to their ids when the segment is trained, and -100 otherwise. The token stream is never
searched for a response template. Because the prompt is tokenized alone, training sees exactly the
tokens the model is given at inference for the same prompt.

Labels are *not* shifted here (Hugging Face convention: ``labels[i]`` is the token at position
``i``). The batching stage shifts them per example, so no example predicts its neighbour's tokens.

Truncation cuts only the tail. An example whose first trained token does not fit is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from sftune.data.formats import BadRow, Format
from sftune.errors import DataError, RowSkip

IGNORE = -100


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before a text when asked to add special tokens (BOS, or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def assemble(
    segment_ids: list[list[int]],
    trained: list[bool],
    *,
    prefix: list[int],
    eos_id: int | None,
    max_length: int,
) -> Tokenized:
    """Concatenate segment ids, label them, append EOS and truncate the tail.

    Raises :class:`RowSkip` when no trained token fits in ``max_length``.
    """
    input_ids = list(prefix)
    labels = [IGNORE] * len(prefix)
    for ids, is_trained in zip(segment_ids, trained):
        input_ids.extend(ids)
        labels.extend(ids if is_trained else [IGNORE] * len(ids))
    if eos_id is not None:
        input_ids.append(eos_id)
        labels.append(eos_id)
    first_trained = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
    if first_trained is None:
        raise RowSkip("no trained tokens")
    if first_trained >= max_length:
        raise RowSkip("prompt longer than max_length")
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Tokenized(input_ids, labels, truncated)


class Tokenizer:
    """The ``datasets.map`` function: a batch of rows -> ids, labels and bookkeeping columns.

    Output columns: ``input_ids``, ``labels``, ``length``, ``n_loss`` (labelled tokens),
    ``truncated``, ``eos_trained``, ``skip`` (the reason, ``""`` when kept), ``row``.
    """

    def __init__(self, fmt: Format, tokenizer, max_length: int, *, on_bad_row: str, source: str):
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.on_bad_row = on_bad_row
        self.source = source
        # Chat templates write their own BOS; other formats get what the tokenizer adds (GPT-2: nothing).
        self.prefix = [] if fmt.name == "messages" else special_prefix(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.end_ids = end_of_turn_ids(tokenizer)

    def _format(self, row: dict, index: int):
        try:
            return self.fmt(row), ""
        except RowSkip as s:
            return None, s.reason
        except BadRow as b:
            if self.on_bad_row == "skip":
                return None, f"bad row: {b.message}"
            raise DataError(b.message, source=self.source, row=index, column=b.column, hint=b.hint) from None
        except DataError as e:
            if e.row is None:
                e = DataError(e.reason, source=self.source, row=index, column=e.column, hint=e.hint)
            raise e from None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        rows = [{k: batch[k][i] for k in keys} for i in range(n)]
        indices = batch.get("__row__", list(range(n)))
        formatted = [self._format(r, idx) for r, idx in zip(rows, indices)]

        # One tokenizer call for every segment of the batch.
        texts, owners = [], []
        for i, (ex, _) in enumerate(formatted):
            if ex is not None:
                for text, _ in ex.segments:
                    texts.append(text)
                    owners.append(i)
        ids_flat = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

        out = {k: [] for k in ("input_ids", "labels", "length", "n_loss", "truncated", "eos_trained", "skip", "row")}
        cursor = 0
        for i, (ex, reason) in enumerate(formatted):
            tok = None
            if ex is not None:
                k = len(ex.segments)
                seg_ids = ids_flat[cursor:cursor + k]
                cursor += k
                try:
                    tok = assemble(
                        seg_ids, [t for _, t in ex.segments],
                        prefix=self.prefix,
                        eos_id=self.eos_id if ex.add_eos else None,
                        max_length=self.max_length,
                    )
                except RowSkip as s:
                    reason = s.reason
            if tok is None:
                tok = Tokenized([], [], False)
            trained = [lab for lab in tok.labels if lab != IGNORE]
            out["input_ids"].append(tok.input_ids)
            out["labels"].append(tok.labels)
            out["length"].append(len(tok.input_ids))
            out["n_loss"].append(len(trained))
            out["truncated"].append(tok.truncated)
            out["eos_trained"].append(bool(trained) and trained[-1] in self.end_ids)
            out["skip"].append(reason)
            out["row"].append(int(indices[i]))
        return out


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end a trained span: EOS, and the special tokens a chat template ends turns with."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None) and tid >= 0:
            ids.add(tid)
    return ids
