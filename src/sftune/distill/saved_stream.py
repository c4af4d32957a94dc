"""Saved teacher rows for a stream (``data.streaming``): keyed by the source's row, checked per example.

A stream tokenizes a window at a time, in a shuffled and mixed order, so its examples cannot be
numbered like a tokenized set's. Each streamed example knows where it came from
(:class:`~sftune.data.examples.StreamExample`: its source, the index of its file among the
source's files, its row in that file, and which of the row's examples it is), and that is the
key of its saved rows: ``sftune distill-prepare`` reads, in file order, every row of each source
that a pass can read (:func:`saved_pass`: its first pass; with ``data.limit`` and several files,
each file's first ``limit`` rows, as later passes order the files anew), tokenized as the stream
tokenizes, and writes, per kept example, its key, a 64-bit hash of its token ids and labels
(``check``) and the teacher's rows.

Shards (``shards/shard-NNNNN``, Arrow, written to a temporary name and renamed) hold at least
``distill.prepare_shard_size`` examples and end at a row; each carries ``shard.json`` (its first
and last key and the reader's cursor after its last row), so a rerun continues from the last
finished shard without reading the rows before it; ``done.json`` marks a finished source. Keys
grow through the pass, so :class:`SavedRows` finds a key with two binary searches (over the
shards' first keys, then in the memory-mapped shard): random access, stateless, nothing held in
memory but the shards' first keys. A resumed stream needs nothing new.

Training looks each example up when its micro-batch is collated (:func:`lookup`); an example
whose key is missing, or whose tokens hash differently from the saved example's, is refused at
once, naming its source, file and row: the rows are for other data. Each source's first examples
and the stream's first window are looked up at start-up (:func:`check_head`), so a directory made
with another tokenizer, format or max_length is refused before the first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from sftune.data.readers import RowReader, stream_files
from sftune.data.stream import CHUNK, first_pass
from sftune.errors import ConfigError

KIND = "teacher"
"""The data seam's kind of a teacher's rows (:mod:`sftune.data.extras`)."""
FILE_BITS, ROW_BITS, PART_BITS = 20, 33, 10
"""A key is ``file << 43 | row << 10 | part``: up to 2^20 files, 2^33 rows per file, 2^10 examples per row."""
HEAD = 16
"""The kept examples of a source's start that (with its files' names) identify it in a mixture."""
SHARD_INFO, DONE = "shard.json", "done.json"


def row_key(file: int, row: int, part: int) -> int | None:
    """The key of a row's ``part``-th example (None past the key's range)."""
    if not (0 <= file < 1 << FILE_BITS and 0 <= row < 1 << ROW_BITS and 0 <= part < 1 << PART_BITS):
        return None
    return (file << (ROW_BITS + PART_BITS)) | (row << PART_BITS) | part


def check_of(ids, labels) -> int:
    """64 bits of a hash of an example's token ids and labels (a signed int64)."""
    h = hashlib.blake2b(np.asarray(ids, dtype=np.int32).tobytes(), digest_size=8)
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int32).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def file_names(spec) -> list[str]:
    """A streamed source's files, relative to the folder that holds them all (a hub dataset: its name)."""
    from sftune.data.readers import stream_files

    files = stream_files(spec.cfg)
    if files is None:
        return [f"hub:{spec.cfg.path}:{spec.cfg.name}:{spec.cfg.split}"]
    base = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [os.path.relpath(os.path.abspath(f), base) for f in files]


def fingerprint(stream, s: int) -> str:
    """Source ``s``'s identity: its files' names and its first :data:`HEAD` kept examples (keys and
    hashes; whatever its ``data.limit``). It finds a source's directory in a mixture; each example
    is still checked when looked up."""
    h = hashlib.sha256(json.dumps(file_names(stream.specs[s])).encode())
    seen = 0
    for examples, _ in first_pass(stream, s, limit=None):
        for e in examples:
            h.update(f"{e.file},{e.row},{e.part},{check_of(e.ids, e.labels)};".encode())
            seen += 1
        if seen >= HEAD:
            break
    return h.hexdigest()[:32]


def saved_pass(stream, s: int, cursor: dict | None = None, limit: int | None | str = "own"):
    """Every row of source ``s`` that a pass can read, in file order, tokenized as the stream tokenizes
    them: ``(kept examples, reader cursor after it)`` per row, from ``cursor`` (one of these cursors).
    ``limit``: rows a pass (``"own"``: the source's ``data.limit``; None: all).

    Without a limit, or with one file, that is the first pass. A pass with a limit reads the first
    ``limit`` rows of its files, and the passes after the first order the files anew
    (:class:`~sftune.data.readers.RowReader`), so any file's first ``min(limit, its rows)`` rows can
    be read: those, file after file (keys still grow)."""
    cfg = stream.specs[s].cfg
    limit = cfg.limit if limit == "own" else limit
    files = stream_files(cfg) if limit is not None else None
    if files is None or len(files) < 2:
        yield from first_pass(stream, s, cursor, limit=limit)
        return
    free = cfg.model_copy(update={"limit": None})
    reader = RowReader(free, s, stream.seed, cursor)
    rows, cursors, ended = [], [], False
    while not ended:
        c = reader.cursor
        if c["row"] >= limit:  # this file's first ``limit`` rows are read: the next file's (the reader's own cursor)
            if c["file"] + 1 >= len(files):
                ended = True
            else:
                reader = RowReader(free, s, stream.seed, {**c, "file": c["file"] + 1, "offset": 0, "row": 0})
        if not ended:
            row = next(reader)
            ended = reader.cursor["pass"] > 0
        if not ended:
            rows.append(row)
            cursors.append(dict(reader.cursor))
        if rows and (ended or len(rows) == CHUNK):
            got = stream.tokenize_rows(s, rows, list(range(len(rows))))
            for p, cur in enumerate(cursors):
                yield got.get(p, []), cur
            rows, cursors = [], []


def check_head(stream, s: int, find) -> None:
    """Look source ``s``'s first :data:`HEAD` kept examples up with ``find`` (a :func:`lookup`): rows
    for other data (another tokenizer, format or max_length, changed first rows) are refused at
    start-up, naming the first example that differs."""
    seen = 0
    for examples, _ in first_pass(stream, s):
        for e in examples:
            find(e)
            seen += 1
        if seen >= HEAD:
            return


def where(label: str, files: list[str], e) -> str:
    """An example's place, for messages: source, file (when several) and row."""
    file = f" of {files[e.file]}" if len(files) > 1 and e.file < len(files) else ""
    part = f" (its example {e.part + 1})" if e.part else ""
    return f"source {label!r}, row {e.row}{file}{part}"


def write_source(stream, s: int, out: Path, shard_size: int, teacher_rows, console=None, limit="own") -> dict:
    """Source ``s``'s rows that a pass can read (``limit`` rows a pass: see :func:`saved_pass`): its
    examples' keys, hashes and teacher rows (``teacher_rows(examples)``: ``{"ids", "logprobs",
    "target"}``, one list per example) in shards under ``out``; resumes after the last finished
    shard. Returns ``done.json``'s content."""
    import datasets

    if (out / DONE).exists():
        return json.loads((out / DONE).read_text())
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    infos = []
    for n in range(len(list(shards.iterdir())) + 1):  # the finished shards, in order
        path = shards / f"shard-{n:05d}"
        if not (path / SHARD_INFO).exists():
            break
        infos.append(json.loads((path / SHARD_INFO).read_text()))
    for path in shards.iterdir():  # after the first missing shard (or cut short): written again, identically
        if not path.name.startswith("shard-") or path.name[6:11] >= f"{len(infos):05d}":
            shutil.rmtree(path)
    already = len(infos)
    label = stream.specs[s].label

    def flush(examples: list, cursor: dict) -> None:
        keys = [row_key(e.file, e.row, e.part) for e in examples]
        if None in keys:
            e = examples[keys.index(None)]
            raise ConfigError(f"{where(label, [], e)}: past what saved teacher rows can key (2^{FILE_BITS} files, "
                              f"2^{ROW_BITS} rows a file, 2^{PART_BITS} examples a row): split the source")
        rows = teacher_rows(examples)
        path = shards / f"shard-{len(infos):05d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_dict({"key": keys, "check": [check_of(e.ids, e.labels) for e in examples], **rows},
                                   features=datasets.Features({
                                       "key": datasets.Value("int64"), "check": datasets.Value("int64"),
                                       "ids": datasets.List(datasets.List(datasets.Value("int32"))),
                                       "logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
                                       "target": datasets.List(datasets.Value("float32"))})).save_to_disk(str(tmp))
        info = {"first": keys[0], "last": keys[-1], "examples": len(examples), "cursor": cursor}
        (tmp / SHARD_INFO).write_text(json.dumps(info))
        tmp.rename(path)
        infos.append(info)
        if console is not None:
            console.print(f"{label}: shard {len(infos)} ({len(examples)} examples, up to row {cursor['row'] - 1} "
                          f"of file {files[cursor['file']]})", markup=False)

    files = file_names(stream.specs[s])
    pending, cursor = [], infos[-1]["cursor"] if infos else None
    for examples, cursor in saved_pass(stream, s, cursor, limit):
        for e in examples:
            if e.extras:
                raise ConfigError(f"{where(label, files, e)} carries {', '.join(e.extras)} beside its tokens: "
                                  "sftune distill-prepare runs a text teacher (use the live teacher)")
        pending += examples
        if len(pending) >= shard_size:
            flush(pending, cursor)
            pending = []
    if pending:
        flush(pending, cursor)
    done = {"examples": sum(i["examples"] for i in infos), "rows": cursor["in_pass"] if cursor else 0,
            "shards": [[i["first"], i["examples"]] for i in infos]}
    (out / DONE).write_text(json.dumps(done))
    if console is not None:
        console.print(f"{label}: the teacher's rows of {done['examples']} examples from {done['rows']} rows in "
                      f"{len(infos)} shards ({already} already there) in {out}", markup=False)
    return done


class SavedRows:
    """One streamed source's saved rows, found by key; a shard is opened (memory-mapped) when first needed."""

    def __init__(self, out: Path, done: dict):
        self.out = out
        self.first = np.asarray([f for f, _ in done["shards"]], dtype=np.int64)
        if np.any(np.diff(self.first) <= 0):
            raise ConfigError(f"{out}/{DONE} lists its shards out of order: rerun sftune distill-prepare with "
                              "another --out")
        self._tables: dict[int, tuple] = {}

    def _table(self, n: int):
        if n not in self._tables:
            import datasets

            table = datasets.load_from_disk(str(self.out / "shards" / f"shard-{n:05d}")).with_format("arrow")[:]
            self._tables[n] = (table, table.column("key").to_numpy())
        return self._tables[n]

    def get(self, key: int | None) -> tuple[int, dict] | None:
        """``(check, payload)`` of the example with ``key``, or None when none was saved."""
        n = int(np.searchsorted(self.first, key, side="right")) - 1 if key is not None else -1
        if n < 0:
            return None
        table, keys = self._table(n)
        i = int(np.searchsorted(keys, key))
        if i >= len(keys) or keys[i] != key:
            return None
        ids, lps = table.column("ids")[i].values, table.column("logprobs")[i].values
        shape = (len(ids), -1) if len(ids) else (0, 0)  # an example whose only label is its first token: no rows
        payload = {"ids": ids.flatten().to_numpy().astype(np.int32).reshape(shape),
                   "logprobs": np.array(lps.flatten().to_numpy(), dtype=np.float32).reshape(shape),
                   "target": np.array(table.column("target")[i].values.to_numpy(), dtype=np.float32)}
        return table.column("check")[i].as_py(), payload


def lookup(saved: str, labels: list[str], files: list[list[str]], rows: list[SavedRows]):
    """The stream's lookup (``example -> {"teacher": payload}``): each example's saved rows, after its hash
    is checked against the saved example's; a clear error at the first example they do not fit."""
    again = "the data, its files, tokenizer, format or max_length changed: rerun sftune distill-prepare"

    def find(e) -> dict:
        got = rows[e.source].get(row_key(e.file, e.row, e.part))
        if got is None:
            place = where(labels[e.source], files[e.source], e)
            raise ConfigError(f"distill.saved={saved} holds no teacher rows for {place}: it was prepared for other "
                              f"data ({again} with this config)")
        check, payload = got
        if check != check_of(e.ids, e.labels):
            place = where(labels[e.source], files[e.source], e)
            raise ConfigError(f"distill.saved={saved} was prepared for other data: {place} has other tokens than the "
                              f"example saved for it ({again} with this config)")
        return {KIND: payload}

    return find
