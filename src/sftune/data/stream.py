"""Streaming (``data.streaming=true``): the data chain as iterators whose position is saved.

sources -> shuffle -> mixture -> format + tokenize -> pack -> batches, each stage holding only a
bounded window: a source's :class:`~sftune.data.readers.RowReader` (a cursor into its files), its
shuffle buffer (``data.shuffle_buffer`` rows; each row read replaces a random one), the mixture's
global example index (:class:`~sftune.data.mixture.Mixture`: the same pure function of
``train.seed`` and the index as in memory), the examples tokenized but not yet packed (``CHUNK``
rows at a time), and the packing window (``data.pack_buffer`` examples packed best-fit-decreasing,
then shuffled). Memory and the time to the first step do not grow with the data; nothing is
copied to Arrow.

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
import pickle
from collections import deque
from types import SimpleNamespace

import numpy as np

from sftune.data.formats import choose_format
from sftune.data.mixture import Mixture, SourceSpec, resolve_sources
from sftune.data.packing import best_fit_decreasing
from sftune.data.pipeline import PreparedData
from sftune.data.readers import RowReader, peek_columns
from sftune.data.report import DataReport
from sftune.data.sources import Source, check_columns
from sftune.data.tokenize import Tokenizer
from sftune.errors import ConfigError

CHUNK = 64
"""Rows taken from the mixture and tokenized together."""


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
            "tokens_trained": 0, "loss_tokens_trained": 0}


class Stream:
    """The chain up to packed units (lists of examples ``(ids, labels, weights, source, row)``)."""

    def __init__(self, specs: list[SourceSpec], tokenizer, max_length: int, *, seed: int, packing: bool,
                 pack_buffer: int, shuffle_buffer: int):
        self.specs, self.max_length, self.seed = specs, max_length, seed
        self.packing, self.pack_buffer, self.shuffle_buffer = packing, pack_buffer, shuffle_buffer
        self.mixture = Mixture([s.weight for s in specs], seed)
        self.formats, self.tokenizers = [], []
        for s in specs:
            columns = peek_columns(s.cfg)
            fmt = choose_format(s.cfg, columns, tokenizer)
            if getattr(fmt, "carries_images", False):  # sftune.data.vision: not carried by streams yet
                raise ConfigError(f"data.streaming: {s.label} holds image conversations for a vision-language "
                                  "model, which streams do not carry yet; train it without data.streaming")
            check_columns(SimpleNamespace(column_names=columns), fmt.columns, s.label, f"the {fmt.name} format")
            self.formats.append(fmt)
            self.tokenizers.append(Tokenizer(fmt, tokenizer, max_length, on_bad_row=s.cfg.on_bad_row, source=s.label))
        self.buffers = [ShuffleBuffer(RowReader(s.cfg, i, seed), shuffle_buffer, [seed, 0x736866, i])
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
            pos = np.flatnonzero(sources == s).tolist()
            keys = list(dict.fromkeys(k for p in pos for k in rows[p][0]))
            batch = {k: [rows[p][0].get(k) for p in pos] for k in keys}
            batch["__row__"] = pos
            out = self.tokenizers[s](batch)
            c = self.counts[s]
            c["rows_read"] += len(pos)
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
                out_by_pos.setdefault(p, []).append((np.asarray(out["input_ids"][k], dtype=np.int32),
                                                     np.asarray(out["labels"][k], dtype=np.int32), weights, s, row_no))
        for p in sorted(out_by_pos):
            self.pending.extend(out_by_pos[p])

    def _example(self):
        while not self.pending:
            self._tokenize_chunk()
        return self.pending.popleft()

    def next_unit(self) -> list:
        if not self.units:
            if not self.packing:
                self.units.append([self._example()])
            else:
                window = [self._example() for _ in range(self.pack_buffer)]
                bins = best_fit_decreasing([len(e[0]) for e in window], self.max_length)
                order = np.random.default_rng([self.seed, 0x706B, self.window]).permutation(len(bins))
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


class ExampleSet:
    """A list of examples behind the one-set interface (lengths, example, example_weights, rows)."""

    def __init__(self, examples: list):
        self.items = examples
        self.lengths = np.asarray([len(e[0]) for e in examples], dtype=np.int64)
        self.rows = np.asarray([e[4] for e in examples], dtype=np.int64)
        self.source = np.asarray([e[3] for e in examples], dtype=np.int64)
        self.n_loss = np.asarray([int((e[1] != -100).sum()) for e in examples], dtype=np.int64)
        self.weighted = any(e[2] is not None for e in examples)

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int):
        return self.items[i][0], self.items[i][1]

    def example_weights(self, i: int):
        ids, labels, w = self.items[i][:3]
        return w if w is not None else (labels != -100).astype(np.float32)


class StreamBatches:
    """This rank's micro-batches of step ``step``, in order, from a :class:`Stream` (the streamed
    counterpart of :class:`sftune.data.packing.Batches`)."""

    def __init__(self, stream: Stream, plan, pad_id: int, rank: int, world: int):
        self.stream, self.plan, self.pad_id, self.rank, self.world = stream, plan, pad_id, rank, world
        self.next_step = 0
        self._before = (0, stream.state_dict())

    def __call__(self, step: int) -> list:
        if step != self.next_step:
            raise RuntimeError(f"a stream gives its steps in order: asked for step {step}, at {self.next_step}")
        self._before = (step, self.stream.state_dict())  # copies of the containers: cheap, pickled only on save
        units = [self.stream.next_unit() for _ in range(self.plan.step_units)]
        self.next_step = step + 1
        examples = [e for u in units for e in u]
        data = ExampleSet(examples)
        for e in examples:  # per-source accounting of what is trained (every rank counts the whole step)
            c = self.stream.counts[e[3]]
            c["examples_trained"] += 1
            c["tokens_trained"] += len(e[0])
            c["loss_tokens_trained"] += int((e[1] != -100).sum())
        starts = np.cumsum([0] + [len(u) for u in units])
        plan = dataclasses.replace(self.plan, lengths=data.lengths,
                                   units=[list(range(starts[k], starts[k + 1])) for k in range(len(units))])
        micro = plan.micro_batches(list(range(len(units))), self.rank, self.world)
        return [plan.batch(m, data, self.pad_id) for m in micro]

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
                    "achieved_share": round(c["examples_trained"] / total, 4), "share_per_epoch": 0.0,
                    # rows taken / rows in a pass, once a pass has ended (0 while the first one lasts)
                    "passes": round(c["rows_read"] / cur["pass_rows"], 3) if cur.get("pass_rows") else 0,
                    "reader_rows": cur["read"]})
    return out


def prepare_stream(cfg, tokenizer, max_length: int, seed: int):
    """The streamed counterpart of ``prepare_data``: a report naming the sources, and a first
    window of examples (from a separate stream) for the start-up probe and the row layout."""
    data_cfg = cfg
    if data_cfg.eval_split is not None:
        raise ConfigError("data.eval_split is not supported with data.streaming=true yet: set data.eval_split=null")
    specs = resolve_sources(data_cfg)
    stream = Stream(specs, tokenizer, max_length, seed=seed, packing=data_cfg.packing,
                    pack_buffer=data_cfg.pack_buffer, shuffle_buffer=data_cfg.shuffle_buffer)
    peek = []
    while len(peek) < min(256, data_cfg.pack_buffer):
        peek.append(stream._example())
    report = DataReport(source=", ".join(s.label for s in specs) + " (streamed)",
                        format="/".join(dict.fromkeys(f.name for f in stream.formats)), split=data_cfg.split,
                        max_length=max_length)
    stream.counts = [_counts() for _ in specs]  # the first window was only looked at: nothing trained yet
    report.sources = source_entries(stream)
    source = Source(train=None, eval=None, name=specs[0].label, rows_read=0)
    return PreparedData(ExampleSet(peek), None, report, None, stream.formats[0], source, max_length)


def stream_batches(cfg, data, plan, tokenizer, rank: int, world: int, seed: int):
    """:class:`StreamBatches` for a streamed run (``None`` otherwise)."""
    if not cfg.data.streaming:
        return None
    specs = resolve_sources(cfg.data)
    stream = Stream(specs, tokenizer, data.max_length, seed=seed, packing=cfg.data.packing,
                    pack_buffer=cfg.data.pack_buffer, shuffle_buffer=cfg.data.shuffle_buffer)
    return StreamBatches(stream, plan, tokenizer.pad_token_id, rank, world)


def streamed_sources(batches) -> list[dict] | None:
    """Per-source counts of a streamed run so far (``None`` when not streamed)."""
    return source_entries(batches.stream) if isinstance(batches, StreamBatches) else None


def first_units(cfg, tokenizer, max_length: int, n: int) -> tuple[ExampleSet, list[list[int]]]:
    """The first ``n`` sequences (packed units) a streamed run trains, from a fresh stream: their
    examples, and each sequence's example indices (``sftune preview``)."""
    stream = Stream(resolve_sources(cfg.data), tokenizer, max_length, seed=cfg.train.seed, packing=cfg.data.packing,
                    pack_buffer=cfg.data.pack_buffer, shuffle_buffer=cfg.data.shuffle_buffer)
    units = [stream.next_unit() for _ in range(n)]
    starts = np.cumsum([0] + [len(u) for u in units]).tolist()
    return ExampleSet([e for u in units for e in u]), [list(range(starts[k], starts[k + 1])) for k in range(n)]
