"""Pre-tokenized rows: ``input_ids`` with TRL's masks, trained as given.

TRL 1.x accepts datasets that are already tokenized: ``input_ids`` and, optionally, ``labels``
(used as they are), or ``completion_mask`` / ``assistant_masks`` (1 where the token is trained).
Such rows have no text to render, so this format replaces the text tokenizer
(:class:`sftune.data.tokenize.RowTokenizer`) with :meth:`PretokenizedFormat.map_function`: the
labels are the ids where every applicable mask is 1 (``completion_mask`` only with completion-only
loss, as TRL), ``-100`` elsewhere; sequences longer than ``max_length`` lose their tail (counted
as truncated), and a row with no trained token left is a counted skip.
"""

from __future__ import annotations

from sftune.data.contract import BadRow, Format
from sftune.data.tokenize import COLUMNS, IGNORE
from sftune.errors import DataError


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

    def map_function(self, tokenizer, max_length: int, source: str):
        """The ``datasets.map`` function (batched) that :func:`sftune.data.pipeline.tokenize_split` runs."""
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
            return out

        return fn
