"""The example-set interface every stage after tokenization reads, and the streamed example.

Three sets implement :class:`ExampleSet`: :class:`~sftune.data.one_source.TokenizedSet` (one
source, memory-mapped from the Arrow cache), :class:`~sftune.data.mixture.MixedSet` (one epoch of
a mixture, drawn over several tokenized sets) and :class:`ExampleList` (examples held in a list:
a stream's window or step). The batch plan, the probe, eval loss, preview and the per-source
accounting read a set only through this interface, so none of them needs to know which set it has.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ExampleSet(Protocol):
    """Tokenized training examples, indexed ``0 .. len - 1``."""

    lengths: np.ndarray
    """Tokens per example (int64)."""
    rows: np.ndarray
    """The source row each example came from (a chat row can give several examples)."""
    source: np.ndarray
    """The index of each example's source in the run's ``data.sources`` (all 0 for one source)."""
    n_loss: np.ndarray
    """Tokens with a loss per example."""
    weighted: bool
    """Some token weights are neither 0 nor 1 (messages' ``weight``): batches carry loss weights."""
    has_extras: bool
    """Some examples carry data beside their tokens (:mod:`sftune.data.extras`)."""

    def __len__(self) -> int:
        """The number of examples."""

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example ``i``'s token ids and labels (-100 where untrained)."""

    def example_weights(self, i: int) -> np.ndarray:
        """Example ``i``'s per-token loss weights (0 where untrained)."""

    def extras(self, i: int) -> dict:
        """Example ``i``'s data beside its tokens, ``{kind: payload}`` (``{}`` for text)."""


class StreamExample(NamedTuple):
    """One tokenized example as a stream carries it."""

    ids: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None
    """Per-token loss weights, or None when every weight is 0 or 1."""
    source: int
    """The index of its source in ``data.sources``."""
    row: int
    """Its row number in that source."""
    extras: dict[str, Any] | None = None
    """Its data beside the tokens, ``{kind: payload}`` (None for text)."""
    file: int = 0
    """The index of its row's file among the source's files (0: one file, a hub dataset)."""
    part: int = 0
    """Which of its row's examples it is (a row can give several), from 0."""


class ExampleList:
    """A list of :class:`StreamExample` behind the :class:`ExampleSet` interface. ``lookups``:
    functions ``example -> {kind: payload}`` whose data joins each example's extras when asked
    (a saved teacher's rows, found by the example's source and row: :mod:`sftune.distill.saved`)."""

    def __init__(self, examples: list[StreamExample], lookups=()):
        self.items, self.lookups = examples, tuple(lookups)
        self.lengths = np.asarray([len(e.ids) for e in examples], dtype=np.int64)
        self.rows = np.asarray([e.row for e in examples], dtype=np.int64)
        self.source = np.asarray([e.source for e in examples], dtype=np.int64)
        self.n_loss = np.asarray([int((e.labels != -100).sum()) for e in examples], dtype=np.int64)
        self.weighted = any(e.weights is not None for e in examples)
        self.has_extras = bool(self.lookups) or any(e.extras for e in examples)

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.items[i].ids, self.items[i].labels

    def example_weights(self, i: int) -> np.ndarray:
        e = self.items[i]
        return e.weights if e.weights is not None else (e.labels != -100).astype(np.float32)

    def extras(self, i: int) -> dict:
        out = dict(self.items[i].extras or {})
        for lookup in self.lookups:
            out.update(lookup(self.items[i]))
        return out
