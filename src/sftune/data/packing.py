"""Packing and batching: tokenized examples -> rows -> optimizer steps -> micro-batch tensors.

* A *unit* is one example, or (``packing``) one sequence of examples packed best-fit-decreasing
  over the whole dataset into at most ``max_length`` tokens.
* A *step* is the units of one optimizer step over all ranks (``batch_size * grad_accum * world``).
  Which units form a step depends only on that product and the seed, so ``8 x 1``, ``2 x 4`` and
  ``2 ranks x 2 x 2`` train on exactly the same examples in each step.
* A micro-batch is laid out in rows (without packing, its examples are packed into as few rows as
  fit: padding-free) and collated padding-right with ``position_ids`` that restart at every example and
  ``targets``: labels shifted left by one *within* each example (-100 at each example's last
  token and on padding). No 2-D attention mask is built: without packing, right padding is
  harmless under a causal mask; with packing, transformers derives per-example masks from
  ``position_ids`` (SDPA/eager on CPU, flash-attention varlen on GPU).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

import sftune.data.extras as data_extras
from sftune.data.tokenize import IGNORE


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Pack item indices into bins of ``capacity`` tokens, longest first, each into the fullest bin
    that still fits it. O(n log capacity) with a segment tree over remaining capacities."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an item of length {int(lengths.max())} exceeds the bin capacity {capacity}")
    size = 1
    while size < capacity + 1:
        size *= 2
    # tree[node] = largest remaining capacity with an open bin in that node's range (-1: none)
    tree = np.full(2 * size, -1, dtype=np.int64)
    open_bins: list[list[int]] = [[] for _ in range(capacity + 1)]  # remaining capacity -> bin ids
    bins: list[list[int]] = []

    def update(cap: int) -> None:
        node = cap + size
        tree[node] = cap if open_bins[cap] else -1
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2

    def smallest_at_least(need: int) -> int:
        """Smallest remaining capacity >= need that has an open bin, or -1."""
        if tree[1] < need:
            return -1
        node, lo, hi = 1, 0, size - 1
        while node < size:
            mid = (lo + hi) // 2
            left = 2 * node
            # the left child's range [lo, mid] may hold a capacity >= need only if need <= mid
            if need <= mid and tree[left] >= need:
                node, hi = left, mid
            else:
                node, lo = left + 1, mid + 1
        return node - size

    for idx in np.argsort(-lengths, kind="stable"):
        length = int(lengths[idx])
        cap = smallest_at_least(length)
        if cap < 0:  # no open bin fits: open a new one
            bins.append([])
            b, cap = len(bins) - 1, capacity
        else:
            b = open_bins[cap].pop()
            update(cap)
        bins[b].append(int(idx))
        if cap - length > 0:
            open_bins[cap - length].append(b)
            update(cap - length)
    return bins


@dataclass
class BatchPlan:
    """The order of optimizer steps, and how each micro-batch is laid out in rows.

    A *unit* is what the data order shuffles: one example, or with ``packing`` one sequence of
    examples packed best-fit-decreasing over the whole dataset. ``units`` lists example indices.
    Without packing, a micro-batch holds ``batch_size`` randomly drawn examples (the usual
    semantics) but is laid out padding-free: its examples are packed into as few rows of at most
    ``max_length`` tokens as fit, with positions restarting at each example.
    """

    lengths: np.ndarray
    units: list[list[int]]
    step_units: int  # units per optimizer step, over all ranks
    micro_units: int  # units per micro-batch, over all ranks
    max_length: int
    seed: int
    packing: bool
    mode: str = "rows"
    """The row layout, chosen once from the model (``sftune.capabilities`` and ``sftune.probe``):
    ``flat``: the model attends per example within a row (``sftune.attention``), so every
    micro-batch is one flat row, with no padding and no block mask; ``rows``: several examples per
    row, boundaries read from ``position_ids``; ``per_example``: one example per row."""
    attn_weight: float = 1 / (6 * 768)
    """Cost of attending to one more context token, relative to a token's linear-layer cost
    (about 1 / (6 * hidden size)); used to choose micro-batch layouts when not ``flat``."""
    bucket: int = 0
    """Pad every row's width up to a multiple of this (``train.bucket``; 0: no padding)."""

    @classmethod
    def build(cls, lengths, *, batch_size: int, grad_accum: int, world_size: int = 1, packing: bool,
              max_length: int, seed: int, flat: bool = False, hidden_size: int = 768,
              layout: str | None = None, bucket: int = 0) -> "BatchPlan":
        lengths = np.asarray(lengths, dtype=np.int64)
        units = best_fit_decreasing(lengths, max_length) if packing else [[i] for i in range(len(lengths))]
        mode = layout or ("flat" if flat else "rows")
        return cls(lengths, units, batch_size * grad_accum * world_size, batch_size * world_size, max_length, seed,
                   packing, mode, 1 / (6 * hidden_size), bucket)

    @property
    def flat(self) -> bool:
        return self.mode == "flat"

    def __post_init__(self):
        self.unit_lengths = np.array([int(self.lengths[u].sum()) for u in self.units], dtype=np.int64)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.units) / self.step_units)

    def total_steps(self, max_steps: int | None, epochs: float) -> int:
        """The run's optimizer steps: ``train.max_steps``, else ``train.epochs`` epochs of this plan."""
        return max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_steps(self, epoch: int) -> list[list[int]]:
        """Unit indices of each optimizer step of ``epoch``: a fresh permutation per epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        n = self.step_units
        return [order[i:i + n].tolist() for i in range(0, len(order), n)]

    def micro_batches(self, step: list[int], rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """Split a step's units into this rank's ``grad_accum`` micro-batches.

        Units are sorted by length first and ranks take them round-robin, so ranks get close token
        counts. The split never changes the step's gradient. A partial last step can leave a
        micro-batch empty.
        """
        ordered = sorted(step, key=lambda u: -self.unit_lengths[u])
        n_micro = self.step_units // self.micro_units
        return [ordered[m * self.micro_units:(m + 1) * self.micro_units][rank::world_size] for m in range(n_micro)]

    def layout(self, units: list[int]) -> list[list[int]]:
        """Rows (lists of example indices) for a micro-batch of units.

        ``flat``: one row holding every example. ``per_example``: one row per example (a packed
        unit is split again). Otherwise, with packing, one row per packed unit;
        without, the cheapest layout by :meth:`layout_cost`: one example per row (plain causal
        attention; best for similar lengths), or packed best-fit-decreasing into rows of
        ``max_length`` or longer (no padding; a block mask over a longer row costs more).
        All layouts give the same loss (tested).
        """
        if self.flat:
            row = [i for u in units for i in self.units[u]]
            return [row] if row else []
        if self.mode == "per_example":
            return [[i] for u in units for i in self.units[u]]
        if self.packing:
            return [self.units[u] for u in units]
        examples = [self.units[u][0] for u in units]
        if not examples:
            return []
        lengths = self.lengths[examples]
        best = [[i] for i in examples]
        best_cost = self.layout_cost([int(n) for n in lengths], causal=True)
        total = int(lengths.sum())
        capacity = self.max_length
        while True:
            rows = best_fit_decreasing(lengths, capacity)
            cost = self.layout_cost([int(lengths[r].sum()) for r in rows], causal=False)
            if cost < best_cost:
                best, best_cost = [[examples[j] for j in row] for row in rows], cost
            if capacity >= total:
                return best
            capacity = min(2 * capacity, total)

    def layout_cost(self, widths: list[int], causal: bool) -> float:
        """Relative compute of rows padded to the widest: linear layers plus attention (half of
        it when the plain causal kernel can skip the masked triangle)."""
        w = max(widths)
        return len(widths) * w * (1 + (0.5 if causal else 1.0) * self.attn_weight * w)

    def batch(self, units: list[int], data, pad_id: int) -> "Batch":
        """Collated tensors for a micro-batch (``data.example(i)`` gives ids and labels; per-token
        weights join them when the data has weights other than 0 and 1; ``data.extras(i)`` the
        example's other data when the set has any, :mod:`sftune.data.extras`)."""
        weighted, extra = getattr(data, "weighted", False), getattr(data, "has_extras", False)

        def one(i):
            ex = data.example(i)
            if not (weighted or extra):
                return ex
            return (*ex, data.example_weights(i) if weighted else None, *([data.extras(i)] if extra else []))

        return collate([[one(i) for i in row] for row in self.layout(units)], pad_id, self.bucket)

    def fill(self, epoch: int = 0) -> float:
        """Real tokens / (rows x row width) over an epoch's micro-batches: 1 - padding waste."""
        real = padded = 0
        for step in self.epoch_steps(epoch):
            for mb in self.micro_batches(step):
                rows = self.layout(mb)
                if rows:
                    widths = [int(self.lengths[r].sum()) for r in rows]
                    real += sum(widths)
                    padded += len(rows) * max(widths)
        return real / padded if padded else 1.0


def bucket_width(width: int, bucket: int) -> int:
    """``width`` rounded up to a multiple of ``bucket`` (0 or 1: unchanged)."""
    return width if bucket <= 1 else -(-width // bucket) * bucket


@dataclass
class Batch:
    """One micro-batch, as :func:`collate` lays it out: the contract between the data stage and the
    loss model (:class:`~sftune.loss.CausalLMWithLoss`)."""

    input_ids: torch.Tensor
    """``[rows, T]`` token ids, padded on the right."""
    position_ids: torch.Tensor
    """``[rows, T]`` positions, restarting at every example (padding continues the last one)."""
    targets: torch.Tensor
    """``[rows, T]`` labels shifted left by one *within* each example (-100: no loss)."""
    loss_index: torch.Tensor
    """Flat positions (into ``rows * T``) that carry a loss, found here on the CPU so the model never syncs."""
    loss_targets: torch.Tensor
    """The target token at each of those positions."""
    n_loss: int
    """Number of loss positions."""
    w_loss: float
    """Their summed weight: the micro-batch's share of the step normaliser (``n_loss`` when unweighted)."""
    real_tokens: int
    """Non-padding tokens (for throughput)."""
    loss_weights: torch.Tensor | None = None
    """Per loss position weight (messages' ``weight``), or None when every weight is 1."""
    doc_bounds: tuple[int, ...] | None = None
    """Cumulative example offsets when the batch is one flat row (per-example attention), else None."""
    model_inputs: dict = dataclasses.field(default_factory=dict)
    """Further keyword arguments of the model's forward, from the examples' extras
    (:mod:`sftune.data.extras`: ``pixel_values``, ...; a ``position_ids`` here replaces the one above)."""
    loss_extras: dict = dataclasses.field(default_factory=dict)
    """Tensors with one row per loss position (following ``loss_index``), from the examples' extras."""

    def to(self, device) -> "Batch":
        """The same batch with its tensors on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        for name in ("model_inputs", "loss_extras"):
            moved[name] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in getattr(self, name).items()}
        return dataclasses.replace(self, **moved)

    def inputs(self, device) -> dict:
        """The keyword arguments of :class:`~sftune.loss.CausalLMWithLoss`, on ``device``."""
        kw = {k: getattr(self, k).to(device, non_blocking=True)
              for k in ("input_ids", "position_ids", "loss_index", "loss_targets")}
        kw["doc_bounds"] = self.doc_bounds
        if self.loss_weights is not None:
            kw["loss_weights"] = self.loss_weights.to(device, non_blocking=True)
        for name in ("model_inputs", "loss_extras"):
            if getattr(self, name):
                kw[name] = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                            for k, v in getattr(self, name).items()}
        return kw


def collate(examples: list[list[tuple]], pad_id: int, bucket: int = 0) -> Batch:
    """Rows of ``(input_ids, labels)``, ``(input_ids, labels, weights)`` or ``(input_ids, labels,
    weights, extras)`` examples -> a :class:`Batch` (``weights`` may be None; ``extras`` is the
    example's ``{kind: payload}``, collated by each kind's collator: :mod:`sftune.data.extras`).

    With weights (per-token loss weights, from messages' ``weight``), ``loss_weights`` holds the
    weight of each loss position's target and ``w_loss`` their sum; without, ``loss_weights`` is
    None and ``w_loss`` equals ``n_loss``.

    ``bucket`` > 1 pads the row width up to a multiple of it (so ``torch.compile`` sees few distinct
    shapes). That padding carries no loss, comes after every example (causal: no example sees it),
    restarts its positions at 0 (within any position table) and is its own segment of a flat row's
    ``doc_bounds``, so every example's result is unchanged. The loss positions are padded to a
    multiple of ``bucket`` too (the count varies with every batch, and would recompile as much):
    the extra slots read the last position with weight 0 in ``loss_weights``, so they add nothing
    to the loss or the gradients; ``n_loss`` and ``w_loss`` count the real ones only.
    """
    natural = max((sum(len(ex[0]) for ex in row) for row in examples), default=1) or 1
    width = bucket_width(natural, bucket)
    weighted = any(len(ex) > 2 and ex[2] is not None for row in examples for ex in row)
    target_w = torch.zeros((max(len(examples), 1), width), dtype=torch.float32) if weighted else None
    n = max(len(examples), 1)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    targets = torch.full((n, width), IGNORE, dtype=torch.long)
    placed: dict[str, list[data_extras.Placed]] = {}
    for r, row in enumerate(examples):
        pos = 0
        for ex in row:
            ids, labels = ex[0], ex[1]
            k = len(ids)
            input_ids[r, pos:pos + k] = torch.from_numpy(np.array(ids, dtype=np.int64))
            position_ids[r, pos:pos + k] = torch.arange(k)
            if k > 1:
                targets[r, pos:pos + k - 1] = torch.from_numpy(np.array(labels[1:], dtype=np.int64))
                if weighted:
                    w = ex[2] if len(ex) > 2 and ex[2] is not None else (np.asarray(labels) != IGNORE)
                    target_w[r, pos:pos + k - 1] = torch.from_numpy(np.array(w[1:], dtype=np.float32))
            if len(ex) > 3 and ex[3]:
                for kind, payload in ex[3].items():
                    placed.setdefault(kind, []).append(data_extras.Placed(r, pos, k, payload))
            pos += k
        # padding continues the last example's positions: no new "document" starts in the padding
        if pos < natural:
            start = int(position_ids[r, pos - 1]) + 1 if pos > 0 else 0
            position_ids[r, pos:natural] = torch.arange(start, start + natural - pos)
    position_ids[:, natural:] = torch.arange(width - natural)
    flat = targets.view(-1)
    loss_index = (flat != IGNORE).nonzero().squeeze(1)
    n_loss = int(loss_index.numel())
    loss_weights = target_w.view(-1).index_select(0, loss_index) if weighted else None
    w_loss = float(loss_weights.sum()) if weighted else float(n_loss)
    loss_targets = flat.index_select(0, loss_index)
    extra = bucket_width(max(n_loss, 1), bucket) - n_loss if bucket > 1 else 0
    if extra:  # bucketed: as many loss slots as a multiple of bucket; the extra ones weigh 0
        loss_weights = torch.cat([loss_weights if weighted else torch.ones(n_loss), torch.zeros(extra)])
        loss_index = torch.cat([loss_index, torch.full((extra,), flat.numel() - 1, dtype=torch.long)])
        loss_targets = torch.cat([loss_targets, torch.zeros(extra, dtype=torch.long)])
    batch = Batch(
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        loss_index=loss_index,
        loss_targets=loss_targets,
        n_loss=n_loss,
        w_loss=w_loss,
        real_tokens=sum(len(ex[0]) for row in examples for ex in row),
        loss_weights=loss_weights,
        doc_bounds=tuple(np.cumsum([0] + [len(ex[0]) for ex in examples[0]] + [width - natural][:width > natural])
                         .tolist()) if len(examples) == 1 and examples[0] else None,
    )
    if placed:
        data_extras.apply(placed, batch)
    return batch


class Batches:
    """This rank's micro-batches for optimizer step ``step`` (deterministic: resume-safe)."""

    def __init__(self, plan: BatchPlan, data, pad_id: int, rank: int, world: int):
        self.plan, self.data, self.pad_id, self.rank, self.world = plan, data, pad_id, rank, world
        self._epoch, self._steps = -1, []

    def __call__(self, step: int) -> list[Batch]:
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._steps = epoch, self.plan.epoch_steps(epoch)
        micro = self.plan.micro_batches(self._steps[index], self.rank, self.world)
        return [self.plan.batch(units, self.data, self.pad_id) for units in micro]
