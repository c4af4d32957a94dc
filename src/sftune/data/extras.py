"""The seam for data that rides with an example's tokens to the model: images, a teacher's distribution.

Text examples are token ids, labels and per-token weights. Other kinds of data travel beside them,
keyed by kind (``"images"``, ``"teacher"``):

* an example set's ``extras(i)`` returns ``{kind: payload}`` for example ``i`` (``{}`` for text);
  sets that can hold extras say so with ``has_extras = True``, so text batches pay nothing;
* :func:`sftune.data.packing.collate` lays examples out in rows as usual, then hands each kind's
  payloads, each with where its example sits (:class:`Placed`), to that kind's collator,
  registered here by the module that owns the kind;
* a collator adds tensors to the :class:`~sftune.data.packing.Batch`: ``model_inputs`` (keyword
  arguments of the model's forward: ``pixel_values``, ``image_grid_thw``, or ``position_ids`` that
  replace the 1-D ones, such as M-RoPE's ``[3, rows, T]``), and ``loss_extras`` (tensors whose
  first dimension follows ``Batch.loss_index``: one row per loss position, such as a teacher's
  top-k token ids and log-probabilities), which the loss reads.

Everything before collate (formats, tokenization, packing, mixtures, streams, the data position)
carries a payload as an opaque value of its example; everything after it sees tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Placed:
    """One example's payload of a kind, and where the example sits in the micro-batch."""

    row: int
    """The batch row the example is in."""
    offset: int
    """Its first token's column in that row."""
    length: int
    """Its number of tokens."""
    payload: Any
    """What the example set gave for this kind."""


Collator = Callable[[list[Placed], Any], None]
"""``collator(placed, batch)``: adds the kind's tensors to ``batch.model_inputs`` / ``batch.loss_extras``.
``placed`` lists the micro-batch's examples that carry the kind, in batch order (row, then offset)."""

_COLLATORS: dict[str, Collator] = {}


def register(kind: str, collator: Collator) -> None:
    """Declare how payloads of ``kind`` become batch tensors (called by the module owning the kind)."""
    _COLLATORS[kind] = collator


def collator(kind: str) -> Collator:
    """The collator of ``kind``; a clear error for a kind nothing registered."""
    try:
        return _COLLATORS[kind]
    except KeyError:
        known = ", ".join(sorted(_COLLATORS)) or "none"
        raise ValueError(f"examples carry {kind!r} data, which no module collates (registered kinds: {known})") from None


def apply(placed: dict[str, list[Placed]], batch) -> None:
    """Run each kind's collator over its placed payloads, in kind order (deterministic)."""
    for kind in sorted(placed):
        collator(kind)(placed[kind], batch)

