"""Pre-tokenized rows: ``input_ids`` with TRL's masks, trained as given.

TRL 1.x accepts datasets that are already tokenized: ``input_ids`` and, optionally, ``labels``
(used as they are), or ``completion_mask`` / ``assistant_masks`` (1 where the token is trained).
Such rows have no text to render, so this format replaces the text tokenizer
(:class:`sftune.data.tokenize.RowTokenizer`) with :meth:`PretokenizedFormat.map_function`: the
labels are the ids where every applicable mask is 1 (``completion_mask`` only with completion-only
loss, as TRL), ``-100`` elsewhere; sequences longer than ``max_length`` lose their tail (counted
as truncated), and a row with no trained token left is a counted skip.

Rows in Axolotl's KD layout also carry a teacher's top-k per input position (``target_token_ids``,
``target_logprobs``, optionally ``target_mask``; row ``p`` is the teacher's distribution for the
token at ``p``): each kept row's entries for its trained positions become its ``teacher`` payload
(column ``extra_teacher``, :mod:`sftune.data.extras`), read by distillation with ``distill.saved=columns``.
"""

from __future__ import annotations

import datasets

from sftune.data.contract import BadRow, Format
from sftune.data.tokenize import COLUMNS, IGNORE
from sftune.errors import DataError


TEACHER_COLUMNS = ("target_token_ids", "target_logprobs")
"""Axolotl's KD columns: a teacher's top-k ids and log-probabilities at every input position."""
TEACHER_FEATURE = {"extra_teacher": {"ids": datasets.List(datasets.List(datasets.Value("int32"))),
                                     "logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
                                     "valid": datasets.List(datasets.List(datasets.Value("bool")))}}


def teacher_payload(row: dict, labels: list[int]) -> dict:
    """The teacher rows of a row's trained positions: position ``p - 1`` predicts the token at ``p``."""
    at = [p for p in range(1, len(labels)) if labels[p] != IGNORE]
    mask = row.get("target_mask")
    return {"ids": [list(row["target_token_ids"][p]) for p in at],
            "logprobs": [list(row["target_logprobs"][p]) for p in at],
            "valid": [[bool(v) for v in mask[p]] if mask is not None else [True] * len(row["target_token_ids"][p])
                      for p in at]}


class PretokenizedFormat(Format):
    """Rows of token ids and masks (no text): see the module docstring."""

    name = "pretokenized"
    columns = ["input_ids"]
    add_bos = False

    def __init__(self, completion_only: bool = True):
        self.completion_only = completion_only

    def describe(self, columns: list[str]) -> str:
        if "labels" in columns:
            return "labels as given"
        masks = [c for c in ("completion_mask", "assistant_masks") if c in columns and
                 (c != "completion_mask" or self.completion_only)]
        return "loss where " + " and ".join(masks) + " is 1" if masks else "every token trained"

    def __call__(self, row: dict):
        raise BadRow("a pre-tokenized row has no text: prompts for generation cannot be built from it", "input_ids",
                     "give the eval set as text to generate from it")

    def identity(self) -> dict:
        return {"format": "text"}

    def cache_key(self) -> str:
        return f"pretokenized:{self.completion_only}"

    def extra_features(self, columns: list[str]) -> dict:
        """The ``extra_<kind>`` columns this format fills for a dataset with ``columns``."""
        return TEACHER_FEATURE if set(TEACHER_COLUMNS) <= set(columns) else {}

    def map_function(self, tokenizer, max_length: int, source: str):
        """The ``datasets.map`` function (batched) that :func:`sftune.data.one_source.tokenize_split` runs."""
        ends = set(self.stop_ids(tokenizer))
        completion_only = self.completion_only

        def labels_of(row: dict, index: int) -> list[int]:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise DataError("input_ids must be a list of token ids", source=source, row=index, column="input_ids")
            if row.get("labels") is not None:
                labels = list(row["labels"])
                masks = []
            else:
                labels = list(ids)
                masks = [row[c] for c in ("completion_mask", "assistant_masks") if row.get(c) is not None and
                         (c != "completion_mask" or completion_only)]
            for m, name in ((x, "labels or masks") for x in masks + ([labels] if row.get("labels") else [])):
                if len(m) != len(ids):
                    raise DataError(f"{name} has {len(m)} entries for {len(ids)} input_ids", source=source,
                                    row=index)
            return [lab if all(m[i] for m in masks) else IGNORE for i, lab in enumerate(labels)]

        def fn(batch: dict[str, list]) -> dict[str, list]:
            keys = list(batch)
            n = len(batch[keys[0]]) if keys else 0
            indices = batch.get("__row__", list(range(n)))
            out = {k: [] for k in COLUMNS}
            teacher = set(TEACHER_COLUMNS) <= set(keys)
            if teacher:
                out["extra_teacher"] = []
            for i in range(n):
                row = {k: batch[k][i] for k in keys}
                ids, labels = list(row["input_ids"]), labels_of(row, int(indices[i]))
                truncated = len(ids) > max_length
                ids, labels = ids[:max_length], labels[:max_length]
                trained = [lab for lab in labels if lab != IGNORE]  # as sftune.data.tokenize counts them
                skip = "" if trained else ("no trained tokens within max_length" if truncated else "no trained tokens")
                if skip:
                    ids, labels = [], []
                weights = [1.0 if lab != IGNORE else 0.0 for lab in labels]
                for k, v in (("input_ids", ids), ("labels", labels), ("weights", weights), ("length", len(ids)),
                             ("n_loss", len(trained)), ("w_loss", float(len(trained))), ("truncated", truncated),
                             ("eos_trained", bool(trained) and trained[-1] in ends), ("skip", skip),
                             ("row", int(indices[i])), ("extra", False), ("straddled", False), ("note", "")):
                    out[k].append(v)
                if teacher:
                    if len(row["target_token_ids"]) < len(labels) or len(row["target_logprobs"]) < len(labels):
                        raise DataError("target_token_ids / target_logprobs need one row per input position "
                                        f"({len(row['input_ids'])})", source=source, row=int(indices[i]))
                    out["extra_teacher"].append(teacher_payload(row, labels) if not skip else None)
            return out

        return fn
