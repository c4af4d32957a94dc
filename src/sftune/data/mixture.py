"""Several sources mixed by weight: which source each training example comes from.

The semantics, in one place (the README's "Several datasets" section repeats them):

* ``data.sources`` lists the sources; each entry sets its own data keys (unset keys inherit the
  top-level ``data.*`` value). Without ``data.sources`` the top-level keys are the one source
  (:func:`resolve_sources` is the one place that decides this).
* A ``weight`` is the target share of training *examples* drawn from that source (weights are
  normalised to sum to 1). It is decided before packing, on examples, not tokens.
* The mixture is a pure function of ``train.seed`` and the global example index, never of the
  number of workers, ranks or the batch size: :class:`Mixture` spreads the sources evenly over the
  indices (a low-discrepancy sequence), so any run of consecutive examples holds each source within
  a few examples of its share.
* A source draws its examples in a shuffled order (seeded by ``train.seed``, the source's index and
  the pass); one that runs out starts a new pass with a new shuffle. The report says how many
  passes each source made.
* In memory, one epoch of the mixture (``train.epochs`` counts these) is as many examples as all
  sources kept together, drawn by weight; the batch plan then shuffles and packs them as it does
  one source. A single source with weight 1 draws each example exactly once: the mixture is then
  the identity (one source trains exactly as before). The shares are exact over an epoch; a run
  shorter than one epoch sees them up to sampling noise, as the plan shuffles the epoch (a stream
  follows the mixture's order, so every stretch of it is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import sftune.data.vision_batch as vision_batch
from sftune.config import DataConfig
from sftune.data.report import DataReport

MIXTURE_TAG = 0x6D6978
"""RNG stream tag ("mix") of the mixture's offset, beside the seed."""
PASS_TAG = 0x736F75
"""RNG stream tag ("sou") of a source's shuffle in each pass, beside the seed, the source and the pass."""


@dataclass
class SourceSpec:
    """One source, resolved: its full data config, its normalised weight and its display label."""

    cfg: DataConfig
    weight: float
    label: str


def resolve_sources(cfg: DataConfig) -> list[SourceSpec]:
    """The sources of a data config: ``data.sources`` (each entry over the top-level keys), or the
    top-level keys as the one source."""
    if not cfg.sources:
        return [SourceSpec(cfg, 1.0, cfg.path)]
    entries = cfg.sources
    total = sum(e.weight for e in entries)
    specs, seen = [], {}
    base = cfg.model_dump(exclude={"sources"})
    for e in entries:
        over = {k: v for k, v in e.model_dump(exclude={"weight", "label"}).items() if v is not None}
        sub = DataConfig.model_validate({**base, **over})
        label = e.label or sub.path
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label} #{seen[label]}"
        specs.append(SourceSpec(sub, e.weight / total, label))
    return specs


class Mixture:
    """Source of every global example index: a pure function of ``seed`` and the index.

    Example ``i`` comes from the source whose cumulative-weight interval holds the point
    ``frac(u + i * phi)``, ``phi`` the golden ratio's fractional part and ``u`` drawn from ``seed``
    (a Weyl sequence, in 64-bit fixed point so every platform computes the same). Its points spread
    evenly, so every run of consecutive indices, from the start or anywhere later, holds each
    source within a few examples of its share, and the sources interleave rather than clump."""

    PHI = np.uint64(0x9E3779B97F4A7C15)  # frac(golden ratio) * 2**64

    def __init__(self, weights, seed: int):
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.cum = np.cumsum(self.weights)
        self.cum[-1] = 2.0  # the last interval takes every point up to 1
        self.seed = seed
        self.offset = np.random.default_rng([seed, MIXTURE_TAG]).integers(0, 2**64, dtype=np.uint64)

    def sources(self, start: int, stop: int) -> np.ndarray:
        """The source index of each global example index in ``[start, stop)``."""
        i = np.arange(start, max(start, stop), dtype=np.uint64)
        points = (self.offset + i * self.PHI) >> np.uint64(11)  # 53 bits: exact in a float64
        return np.searchsorted(self.cum, points.astype(np.float64) / 2.0**53, side="right").astype(np.int64)


def pass_order(seed: int, source: int, n: int, p: int) -> np.ndarray:
    """The order in which a source of ``n`` examples is drawn in its pass ``p`` (a new shuffle per pass)."""
    return np.random.default_rng([seed, PASS_TAG, source, p]).permutation(n)


def draw(mixture: Mixture, sizes: list[int], seed: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The examples of global indices ``[start, stop)``: ``(source, example, draws)`` where
    ``draws[s]`` is how many examples source ``s`` gave before ``stop`` (from index 0)."""
    src = mixture.sources(0, stop)
    example = np.zeros(stop, dtype=np.int64)
    draws = np.zeros(len(sizes), dtype=np.int64)
    for s, n in enumerate(sizes):
        where = np.flatnonzero(src == s)
        k = np.arange(len(where))
        draws[s] = len(where)
        if not len(where):
            continue
        order = np.concatenate([pass_order(seed, s, n, p) for p in range(int(k[-1] // n) + 1)])
        example[where] = order[k]
    return src[start:], example[start:], draws


class MixedSet:
    """Drawn examples of several tokenized sets, behind the one-set interface
    (:class:`~sftune.data.examples.ExampleSet`) the batch plan, the probe and the loss evaluation read.
    ``source[i]`` is the source of example ``i``; ``index[i]`` its index in that source's set."""

    def __init__(self, parts: list, source: np.ndarray, index: np.ndarray):
        self.parts = parts
        self.source = np.asarray(source, dtype=np.int64)
        self.index = np.asarray(index, dtype=np.int64)
        self.lengths = self._gather(lambda p: p.lengths)
        self.rows = self._gather(lambda p: p.rows)
        self.n_loss = self._gather(lambda p: p.n_loss)
        self.w_loss = self._gather(lambda p: p.w_loss)
        self.weighted = any(p.weighted for p in parts)

    @property
    def has_extras(self) -> bool:
        """Whether some source's examples carry extras (asked at each batch: a source may gain a kind
        after the mixture is built, such as a teacher's saved rows, :mod:`sftune.distill.saved`)."""
        return any(p.has_extras for p in self.parts)

    def _gather(self, get) -> np.ndarray:
        values = [np.asarray(get(p)) for p in self.parts]
        out = np.zeros(len(self.source), dtype=values[0].dtype)
        for s, v in enumerate(values):
            sel = self.source == s
            out[sel] = v[self.index[sel]]
        return out

    def __len__(self) -> int:
        return len(self.source)

    def example(self, i: int):
        return self.parts[self.source[i]].example(int(self.index[i]))

    def example_weights(self, i: int):
        return self.parts[self.source[i]].example_weights(int(self.index[i]))

    def extras(self, i: int) -> dict:
        part = self.parts[self.source[i]]
        return part.extras(int(self.index[i])) if part.has_extras else {}


def mixed_epoch(parts: list, weights: list[float], seed: int) -> tuple[MixedSet, np.ndarray]:
    """One epoch of the mixture over in-memory sets: as many draws as all parts hold together,
    sorted by (source, example) so the batch plan sees each source in its own order. Returns the
    set and the number of draws per source."""
    sizes = [len(p) for p in parts]
    src, idx, draws = draw(Mixture(weights, seed), sizes, seed, 0, sum(sizes))
    order = np.lexsort((idx, src))
    return MixedSet(parts, src[order], idx[order]), draws


def trained_by_source(plan, data, total_steps: int) -> dict[str, np.ndarray]:
    """Examples, tokens and loss tokens per source over the run's ``total_steps`` optimizer steps,
    read from the batch plan (the run trains exactly these)."""
    source = data.source
    n_src = int(source.max()) + 1 if len(source) else 1
    examples = np.zeros(n_src, dtype=np.int64)
    tokens = np.zeros(n_src, dtype=np.int64)
    loss = np.zeros(n_src, dtype=np.int64)
    per_epoch = plan.steps_per_epoch
    for epoch in range(-(-total_steps // per_epoch)):
        steps = plan.epoch_steps(epoch)[:total_steps - epoch * per_epoch]
        units = [u for step in steps for u in step]
        ex = np.asarray([i for u in units for i in plan.units[u]], dtype=np.int64)
        if not len(ex):
            continue
        examples += np.bincount(source[ex], minlength=n_src)
        tokens += np.bincount(source[ex], weights=data.lengths[ex], minlength=n_src).astype(np.int64)
        loss += np.bincount(source[ex], weights=data.n_loss[ex], minlength=n_src).astype(np.int64)
    return {"examples": examples, "tokens": tokens, "loss_tokens": loss}


def fill_trained(report, plan, data, total_steps: int) -> None:
    """Write what the run trains per source (examples, tokens, achieved share) into ``report.sources``."""
    if not report.sources:
        return
    t = trained_by_source(plan, data, total_steps)
    total = max(int(t["examples"].sum()), 1)
    for s, entry in enumerate(report.sources):
        entry["examples_trained"] = int(t["examples"][s])
        entry["tokens_trained"] = int(t["tokens"][s])
        entry["loss_tokens_trained"] = int(t["loss_tokens"][s])
        entry["achieved_share"] = round(int(t["examples"][s]) / total, 4)
        entry["passes"] = round(int(t["examples"][s]) / max(entry["kept"], 1), 3)


def mix_prepared(prepared: list, specs: list[SourceSpec], seed: int):
    """One epoch of the mixture over the sources' prepared data (each through the one-source
    stages: load, format, tokenize, report; cached): the train set, the eval set (every source's
    held-out examples, once), and their reports."""
    train, draws = mixed_epoch([p.train for p in prepared], [s.weight for s in specs], seed)
    with_eval = [(s, p) for s, p in enumerate(prepared) if p.eval is not None]
    eval_set = eval_report = None
    if with_eval:
        parts = [p.eval for _, p in with_eval]
        src = np.concatenate([np.full(len(e), s, dtype=np.int64) for s, e in enumerate(parts)])
        idx = np.concatenate([np.arange(len(e), dtype=np.int64) for e in parts])
        eval_set = MixedSet(parts, src, idx)
        eval_report = merge_reports([p.eval_report for _, p in with_eval], [specs[s] for s, _ in with_eval],
                                    eval_set, None)
    report = merge_reports([p.report for p in prepared], specs, train, draws)
    return train, eval_set, report, eval_report


def merge_reports(reports: list, specs: list[SourceSpec], data: MixedSet, draws) -> DataReport:
    """One report for the mixture: counts summed over the sources (skip reasons named per source),
    token figures over the drawn examples, and a ``sources`` entry per source."""
    labels = [s.label for s in specs]
    first = reports[0]
    rep = DataReport(source="mixture of " + ", ".join(labels),
                     format="/".join(dict.fromkeys(r.format for r in reports)),
                     split="/".join(dict.fromkeys(r.split for r in reports)), max_length=first.max_length)
    for r, label in zip(reports, labels):
        rep.rows_read += r.rows_read
        rep.rows_used += r.rows_used
        rep.kept_rows += r.kept_rows
        rep.truncated += r.truncated
        rep.eos_not_trained += r.eos_not_trained
        rep.expanded_rows += r.expanded_rows
        rep.expanded_sequences += r.expanded_sequences
        rep.expanded_tokens += r.expanded_tokens
        rep.straddled += r.straddled
        for why, n in r.skipped.items():
            rep.skipped[f"{label}: {why}"] = n
            rep.skipped_rows[f"{label}: {why}"] = r.skipped_rows[why]
        for why, n in r.expanded_why.items():
            rep.expanded_why[why] = rep.expanded_why.get(why, 0) + n
        for note, n in r.notes.items():
            rep.notes[f"{label}: {note}"] = n
            rep.note_rows[f"{label}: {note}"] = r.note_rows[note]
    rep.kept = len(data)
    rep.images = vision_batch.combined([r.images for r in reports])  # over each source's kept examples
    rep.truncated_rows = next((r.truncated_rows for r in reports if r.truncated_rows), [])
    lengths = np.asarray(data.lengths)
    rep.total_tokens = int(lengths.sum())
    rep.loss_tokens = int(np.asarray(data.n_loss).sum())
    if len(lengths):
        for q in (50, 90, 99):
            rep.length_percentiles[f"p{q}"] = int(np.percentile(lengths, q))
        rep.length_percentiles["max"] = int(lengths.max())
        rep.length_percentiles["min"] = int(lengths.min())
    total = max(len(data), 1)
    for s, (r, spec) in enumerate(zip(reports, specs)):
        n = int((data.source == s).sum()) if draws is None else int(draws[s])
        rep.sources.append({
            "label": spec.label, "path": spec.cfg.path, "target_share": round(spec.weight, 4),
            "rows_read": r.rows_read, "rows_used": r.rows_used, "kept": r.kept, "skipped": dict(r.skipped),
            "truncated": r.truncated, "draws_per_epoch": n, "share_per_epoch": round(n / total, 4),
        })
    return rep
