"""Streaming (``data.streaming=true``): the data chain as iterators whose position is saved.

sources -> shuffle -> mixture -> format + tokenize -> pack -> batches, each stage holding only a
bounded window: a source's :class:`~sftune.data.readers.RowReader` (a cursor into its files), its
shuffle buffer (``data.shuffle_buffer`` rows; each row read replaces a random one), the mixture's
global example index (:class:`~sftune.data.mixture.Mixture`: the same pure function of
``train.seed`` and the index as in memory), the examples tokenized but not yet packed (``CHUNK``
rows at a time), and the packing window (``data.pack_buffer`` examples packed best-fit-decreasing,
then shuffled). Memory and the time to the first step do not grow with the data; nothing is
copied to Arrow. Each source is read in its own format with that format's row tokenizer, so
examples carry their data beside the tokens (``extras``: a vision-language model's processed
images, their paths relative to the source's file) through the buffers and the saved position.

:meth:`StreamBatches.state_at` is the whole position (cursors, buffers, RNG states, pending
examples and units, per-source counts) at the start of a step; it goes into every checkpoint
(:mod:`sftune.data.position`) and a resume continues from it with identical batches,
without re-reading or re-tokenizing what was consumed. A resume whose sources, weights, tokenizer,
format or batch shape changed is refused, naming what changed.

Every rank runs the same chain (the stream is a function of the seed alone) and trains its own
share of each step's units, as in memory: 2 ranks x batch b train exactly like 1 process x 2b.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import pickle
from collections import deque
from types import SimpleNamespace

import numpy as np

import sftune.data.vision_batch as vision_batch
from sftune.data.examples import ExampleList, StreamExample
from sftune.data.formats import choose_format
from sftune.data.mixture import Mixture, SourceSpec
from sftune.data.packing import best_fit_decreasing
from sftune.data.one_source import EXTRA_PREFIX, PreparedData
from sftune.data.readers import RowReader, peek_columns
from sftune.data.report import DataReport
from sftune.data.sources import Source, check_columns
from sftune.data.tokenize import row_tokenizer
from sftune.errors import ConfigError

CHUNK = 64
"""Rows taken from the mixture and tokenized together."""
PEEK = 256
"""Examples of a separate stream looked at before training (the probe's and the layout's window)."""
SHUFFLE_TAG = 0x736866
"""RNG stream tag ("shf") of a source's shuffle buffer, beside the seed and the source index."""
PACK_TAG = 0x706B
"""RNG stream tag ("pk") of the order of a packing window's units, beside the seed and the window."""


class ShuffleBuffer:
    """A source's rows in a shuffled order: a buffer of ``size`` rows, each draw replaced by the next row read."""

    def __init__(self, reader: RowReader, size: int, seed: list[int]):
        self.reader, self.size, self.buf = reader, size, []
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[dict, int]:
        if self.size <= 1:
            return next(self.reader)
        while len(self.buf) < self.size:
            self.buf.append(next(self.reader))
        j = int(self.rng.integers(len(self.buf)))
        out, self.buf[j] = self.buf[j], next(self.reader)
        return out


def _counts() -> dict:
    return {"rows_read": 0, "kept": 0, "skipped": {}, "skipped_rows": {}, "truncated": 0, "examples_trained": 0,
            "tokens_trained": 0, "loss_tokens_trained": 0, "lengths": {}}


class Stream:
    """The chain up to packed units (lists of :class:`~sftune.data.examples.StreamExample`)."""

    @classmethod
    def for_run(cls, specs: list[SourceSpec], cfg, tokenizer, max_length: int, seed: int,
                lookups: list | None = None) -> "Stream":
        """A fresh stream of a run's sources, with ``cfg``'s (``data.*``) packing and buffers."""
        return cls(specs, tokenizer, max_length, seed=seed, packing=cfg.packing, pack_buffer=cfg.pack_buffer,
                   shuffle_buffer=cfg.shuffle_buffer, lookups=lookups)

    def __init__(self, specs: list[SourceSpec], tokenizer, max_length: int, *, seed: int, packing: bool,
                 pack_buffer: int, shuffle_buffer: int, lookups: list | None = None):
        self.specs, self.max_length, self.seed = specs, max_length, seed
        self.lookups = lookups if lookups is not None else []  # ExampleList's lookups, shared with PreparedData
        self.packing, self.pack_buffer, self.shuffle_buffer = packing, pack_buffer, shuffle_buffer
        self.mixture = Mixture([s.weight for s in specs], seed)
        self.formats, self.tokenizers = [], []
        for s in specs:
            columns = peek_columns(s.cfg)
            fmt = choose_format(s.cfg, columns, tokenizer)
            check_columns(SimpleNamespace(column_names=columns), fmt.columns, s.label, f"the {fmt.name} format")
            self.formats.append(fmt)
            self.tokenizers.append(row_tokenizer(fmt, tokenizer, max_length, on_bad_row=s.cfg.on_bad_row,
                                                 source=s.label))
        self.buffers = [ShuffleBuffer(RowReader(s.cfg, i, seed), shuffle_buffer, [seed, SHUFFLE_TAG, i])
                        for i, s in enumerate(specs)]
        self.index = 0  # the mixture's next global example index
        self.pending: deque = deque()  # tokenized examples not yet packed
        self.units: deque = deque()  # packed units not yet batched
        self.window = 0
        self.counts = [_counts() for _ in specs]

    # ---------------------------------------------------------------- stages
    def _tokenize_chunk(self) -> None:
        sources = self.mixture.sources(self.index, self.index + CHUNK)
        self.index += CHUNK
        rows = [self.buffers[s].next() for s in sources]
        out_by_pos: dict[int, list] = {}
        for s in np.unique(sources).tolist():
            out_by_pos.update(self.tokenize_rows(s, rows, np.flatnonzero(sources == s).tolist()))
        for p in sorted(out_by_pos):
            self.pending.extend(out_by_pos[p])

    def tokenize_rows(self, s: int, rows: list, pos: list[int]) -> dict[int, list[StreamExample]]:
        """Source ``s``'s rows ``rows[p]`` (``(row, number, file)``) for ``p`` in ``pos``, tokenized
        together: each position's kept examples (skips counted in ``counts[s]``)."""
        keys = list(dict.fromkeys(k for p in pos for k in rows[p][0]))
        batch = {k: [rows[p][0].get(k) for p in pos] for k in keys}
        batch["__row__"] = pos
        out = self.tokenizers[s](batch)
        c = self.counts[s]
        c["rows_read"] += len(pos)
        out_by_pos: dict[int, list] = {}
        for k, p in enumerate(out["row"]):
            row_no = rows[p][1]
            if out["skip"][k]:
                why = out["skip"][k]
                c["skipped"][why] = c["skipped"].get(why, 0) + 1
                c["skipped_rows"].setdefault(why, [])
                if len(c["skipped_rows"][why]) < 5:
                    c["skipped_rows"][why].append(row_no)
                continue
            c["kept"] += 1
            c["truncated"] += bool(out["truncated"][k])
            w = np.asarray(out["weights"][k], dtype=np.float32)
            weights = None if np.all((w == 0) | (w == 1)) else w
            extras = {key[len(EXTRA_PREFIX):]: out[key][k] for key in out
                      if key.startswith(EXTRA_PREFIX) and out[key][k] is not None}
            file = rows[p][2] if len(rows[p]) > 2 else 0  # a position saved before rows named their file: 0
            mine = out_by_pos.setdefault(p, [])
            mine.append(StreamExample(np.asarray(out["input_ids"][k], dtype=np.int32),
                                      np.asarray(out["labels"][k], dtype=np.int32), weights, s, row_no, extras or None,
                                      file, len(mine)))
        return out_by_pos

    def next_example(self) -> StreamExample:
        """The next tokenized example, in the mixture's order (before packing)."""
        while not self.pending:
            self._tokenize_chunk()
        return self.pending.popleft()

    def next_unit(self) -> list:
        if not self.units:
            if not self.packing:
                self.units.append([self.next_example()])
            else:
                window = [self.next_example() for _ in range(self.pack_buffer)]
                bins = best_fit_decreasing([len(e.ids) for e in window], self.max_length)
                order = np.random.default_rng([self.seed, PACK_TAG, self.window]).permutation(len(bins))
                self.units.extend([window[i] for i in bins[b]] for b in order)
                self.window += 1
        return self.units.popleft()

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict:
        """The position, in copies of the mutable containers (rows and examples are never changed in place)."""
        return {"index": self.index, "window": self.window, "pending": list(self.pending), "units": list(self.units),
                "counts": copy.deepcopy(self.counts),
                "sources": [{"cursor": dict(b.reader.cursor), "buf": list(b.buf), "rng": b.rng.bit_generator.state}
                            for b in self.buffers]}

    def load_state_dict(self, state: dict) -> None:
        self.index, self.window = state["index"], state["window"]
        self.pending, self.units = deque(state["pending"]), deque(state["units"])
        self.counts = copy.deepcopy(state["counts"])
        for i, (b, st) in enumerate(zip(self.buffers, state["sources"])):
            b.reader = RowReader(self.specs[i].cfg, i, self.seed, st["cursor"])
            b.buf = list(st["buf"])
            b.rng.bit_generator.state = st["rng"]


class StreamBatches:
    """This rank's micro-batches of step ``step``, in order, from a :class:`Stream` (the streamed
    counterpart of :class:`sftune.data.packing.Batches`)."""

    def __init__(self, stream: Stream, plan, pad_id: int, rank: int, world: int):
        self.stream, self.plan, self.pad_id, self.rank, self.world = stream, plan, pad_id, rank, world
        self.next_step = 0
        self._before = (0, stream.state_dict())

    def rows(self, step: int) -> tuple[ExampleList, list[list[list[int]]]]:
        """Step ``step``'s examples and this rank's micro-batches, each as its rows of example indices."""
        if step != self.next_step:
            raise RuntimeError(f"a stream gives its steps in order: asked for step {step}, at {self.next_step}")
        self._before = (step, self.stream.state_dict())  # copies of the containers: cheap, pickled only on save
        units = [self.stream.next_unit() for _ in range(self.plan.step_units)]
        self.next_step = step + 1
        examples = [e for u in units for e in u]
        data = ExampleList(examples, self.stream.lookups)  # a lookup asks only for this rank's examples
        for e in examples:  # per-source accounting of what is trained (every rank counts the whole step)
            c = self.stream.counts[e.source]
            c["examples_trained"] += 1
            c["tokens_trained"] += len(e.ids)
            c["loss_tokens_trained"] += int((e.labels != -100).sum())
            c["lengths"][len(e.ids)] = c["lengths"].get(len(e.ids), 0) + 1
            if e.extras and e.extras.get(vision_batch.KIND):  # images: counted as the in-memory report does
                vision_batch.count(c.setdefault("images", {}), e.extras[vision_batch.KIND])
        starts = np.cumsum([0] + [len(u) for u in units])
        plan = dataclasses.replace(self.plan, lengths=data.lengths,
                                   units=[list(range(starts[k], starts[k + 1])) for k in range(len(units))])
        micro = plan.micro_batches(list(range(len(units))), self.rank, self.world)
        return data, [plan.layout(m) for m in micro]

    def __call__(self, step: int) -> list:
        data, micro = self.rows(step)
        return [self.plan.collate_rows(rows, data, self.pad_id) for rows in micro]

    def restore(self, state: dict, step: int) -> None:
        """Continue from ``state`` (a :meth:`state_at`, unpickled) as the position of ``step``."""
        self.stream.load_state_dict(state)
        self.next_step = step
        self._before = (step, self.stream.state_dict())

    def state_at(self, step: int) -> bytes:
        """The stream's position at the start of ``step`` (the next step, or the one in progress)."""
        if step == self._before[0]:
            return pickle.dumps(self._before[1])
        if step != self.next_step:
            raise RuntimeError(f"the stream's position at step {step} is not known (at {self.next_step})")
        return pickle.dumps(self.stream.state_dict())

    def seen(self) -> dict:
        """Examples and tokens trained so far, over all ranks (a stream has no epochs)."""
        counts = self.stream.counts
        return {"examples_seen": sum(c["examples_trained"] for c in counts),
                "tokens_seen": sum(c["tokens_trained"] for c in counts)}

    def sources(self) -> list[dict]:
        """Per-source counts of the run so far: what was read and what was trained."""
        return source_entries(self.stream)

    def fill_report(self, report: DataReport) -> None:
        """The report's totals from what the stream read and trained (its per-source lines too)."""
        counts = self.stream.counts
        report.sources = self.sources()
        report.rows_read = report.rows_used = sum(c["rows_read"] for c in counts)
        report.kept = report.kept_rows = sum(c["kept"] for c in counts)
        report.truncated = sum(c["truncated"] for c in counts)
        report.skipped, report.skipped_rows = {}, {}
        for spec, c in zip(self.stream.specs, counts):
            label = f"{spec.label}: " if len(counts) > 1 else ""
            for why, n in c["skipped"].items():
                report.skipped[label + why] = n
                report.skipped_rows[label + why] = list(c["skipped_rows"][why])
        report.total_tokens = sum(c["tokens_trained"] for c in counts)
        report.loss_tokens = sum(c["loss_tokens_trained"] for c in counts)
        report.images = vision_batch.merged([c.get("images", {}) for c in counts])
        hist: dict[int, int] = {}
        for c in counts:
            for length, n in c.get("lengths", {}).items():
                hist[length] = hist.get(length, 0) + n
        if hist:
            lengths = np.repeat(np.fromiter(hist, dtype=np.int64), np.fromiter(hist.values(), dtype=np.int64))
            report.length_percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}
            report.length_percentiles.update(max=int(lengths.max()), min=int(lengths.min()))


def source_entries(stream: Stream) -> list[dict]:
    total = max(sum(c["examples_trained"] for c in stream.counts), 1)
    out = []
    for spec, c, b in zip(stream.specs, stream.counts, stream.buffers):
        cur = b.reader.cursor
        out.append({"label": spec.label, "path": spec.cfg.path, "target_share": round(spec.weight, 4),
                    "rows_read": c["rows_read"], "rows_used": c["rows_read"], "kept": c["kept"],
                    "skipped": dict(c["skipped"]), "skipped_rows": dict(c["skipped_rows"]), "truncated": c["truncated"],
                    "examples_trained": c["examples_trained"], "tokens_trained": c["tokens_trained"],
                    "loss_tokens_trained": c["loss_tokens_trained"],
                    "images_trained": sum(c.get("images", {}).get("per_image", {}).values()),
                    "achieved_share": round(c["examples_trained"] / total, 4), "share_per_epoch": 0.0,
                    # rows taken / rows in a pass, once a pass has ended (0 while the first one lasts)
                    "passes": round(c["rows_read"] / cur["pass_rows"], 3) if cur.get("pass_rows") else 0,
                    "reader_rows": cur["read"]})
    return out


def prepare_stream(cfg, tokenizer, max_length: int, seed: int, specs: list[SourceSpec]) -> PreparedData:
    """The streamed counterpart of ``prepare_data``: a report naming the sources, a first window of
    examples (from a separate stream) for the start-up probe and the row layout, and ``stream``, the
    factory of the run's fresh streams (training's, preview's)."""
    if cfg.eval_split is not None:
        raise ConfigError("data.eval_split is not supported with data.streaming=true yet: set data.eval_split=null")
    lookups: list = []  # filled by distill.saved (sftune.distill.saved), read by every stream of the run
    new_stream = functools.partial(Stream.for_run, specs, cfg, tokenizer, max_length, seed, lookups)
    stream = new_stream()
    peek = [stream.next_example() for _ in range(min(PEEK, cfg.pack_buffer))]
    report = DataReport(source=", ".join(s.label for s in specs) + " (streamed)",
                        format="/".join(dict.fromkeys(f.name for f in stream.formats)), split=cfg.split,
                        max_length=max_length, streamed=True)
    stream.counts = [_counts() for _ in specs]  # the first window was only looked at: nothing trained yet
    report.sources = source_entries(stream)
    source = Source(train=None, eval=None, name=specs[0].label, rows_read=0)
    return PreparedData(ExampleList(peek), None, report, None, stream.formats[0], source, max_length,
                        formats=list(stream.formats),
                        stream=new_stream, lookups=lookups)


def first_pass(stream: Stream, s: int, cursor: dict | None = None, *, limit: int | None | str = "own"):
    """Source ``s``'s first pass in its files' order (no shuffle, no mixture), from ``cursor`` (a
    reader's, inside that pass): ``(kept examples, reader cursor after it)`` per row, tokenized as
    the stream tokenizes them (``CHUNK`` rows together). ``sftune distill-prepare`` reads a stream so.
    ``limit``: rows in the pass (``"own"``: the source's ``data.limit``; None: all)."""
    cfg = stream.specs[s].cfg
    reader = RowReader(cfg if limit == "own" else cfg.model_copy(update={"limit": limit}), s, stream.seed, cursor)
    ended = False
    while not ended:
        rows, cursors = [], []
        while len(rows) < CHUNK:
            row = next(reader)
            if reader.cursor["pass"] > 0:
                ended = True
                break
            rows.append(row)
            cursors.append(dict(reader.cursor))
        got = stream.tokenize_rows(s, rows, list(range(len(rows)))) if rows else {}
        for p, cur in enumerate(cursors):
            yield got.get(p, []), cur
