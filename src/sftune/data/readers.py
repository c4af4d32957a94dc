"""Row readers for streaming: one source's rows in order, read lazily, resumable by cursor.

A :class:`RowReader` walks a source's files (one file, a directory's files of ``data.split``, or a
glob) and yields ``(row, row_number, file_index)``; its :attr:`cursor` says where it stands, and a reader
built with that cursor continues from there without reading what came before:

* JSON lines: the byte offset of the next line (``seek``);
* Parquet: the row index, reached by skipping whole row groups (one row group is in memory);
* CSV: the row index (rows before it are read again but not tokenized);
* a JSON list (``[...]``) file is parsed whole: use JSON lines for large data;
* hub datasets: ``datasets``' streaming reader; a resume skips the rows already read (``skip``).

At the end of its rows a reader starts the next *pass* (files in a new order, seeded by the pass)
and counts it: a source never runs dry.
"""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import numpy as np

from sftune.config import DataConfig
from sftune.errors import DataError

KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILES_TAG = 0x66696C
"""RNG stream tag ("fil") of a source's file order in each pass after the first, beside the seed,
the source and the pass."""


def stream_files(cfg: DataConfig) -> list[str] | None:
    """The local files of a streamed source, in order (``None``: a hub dataset)."""
    from sftune.data.sources import local_files

    path = Path(cfg.path).expanduser()
    if any(ch in cfg.path for ch in "*?["):
        files = sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).suffix.lower() in KINDS)
        if not files:
            raise DataError("the pattern matches no .jsonl/.json/.csv/.parquet file", source=cfg.path)
    elif path.is_file() or path.is_dir():
        _, splits = local_files(path)
        files = splits.get(cfg.split) or (next(iter(splits.values())) if len(splits) == 1 else None)
        if not files:
            raise DataError(f"there are no '{cfg.split}' files; the splits are {', '.join(splits)}",
                            source=cfg.path, hint="set data.split to one of them")
    elif cfg.path.startswith(("builtin:", ".", "/", "~")) or cfg.path.endswith(tuple(KINDS)):
        raise DataError("file not found (streaming reads local files, a directory, a glob or a hub dataset)",
                        source=cfg.path, hint="check data.path")
    else:
        return None
    kinds = {KINDS[Path(f).suffix.lower()] for f in files}
    if len(kinds - {"json", "jsonl"}) + bool(kinds & {"json", "jsonl"}) > 1:
        raise DataError(f"the files mix types ({', '.join(sorted(kinds))})", source=cfg.path,
                        hint="keep one kind of file per source")
    return [str(f) for f in files]


class RowReader:
    """One source's rows, pass after pass. ``cursor``: ``{"pass", "file", "offset", "row", "read"}``
    (``file``: index in this pass's file order; ``offset``: byte offset or row index in it;
    ``row``: the row's number in its file; ``read``: rows read over all passes; ``in_pass``: in this
    pass; ``pass_rows``: rows in a whole pass, once one ended)."""

    def __init__(self, cfg: DataConfig, index: int, seed: int, cursor: dict | None = None):
        self.cfg, self.index, self.seed = cfg, index, seed
        self.files = stream_files(cfg)
        self.cursor = dict(cursor or {"pass": 0, "file": 0, "offset": 0, "row": 0, "read": 0, "in_pass": 0})
        self._it = None
        self._file = 0  # the open file's index in ``files`` (0: a hub dataset)

    def _order(self, p: int) -> list[int]:
        n = len(self.files)
        if p == 0 or n == 1:
            return list(range(n))
        return np.random.default_rng([self.seed, FILES_TAG, self.index, p]).permutation(n).tolist()

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, int, int]:
        """``(row, its number in its file, the file's index in files)``."""
        while True:  # past empty files and the ends of passes (a pass without rows raises in _new_pass)
            if self._it is None:
                self._it = self._open()
            try:
                row, where = next(self._it)
            except StopIteration:
                self._it = None
                self._end_of_file()
                continue
            c = self.cursor
            if self.cfg.limit is not None and c["in_pass"] >= self.cfg.limit:
                self._it = None
                self._new_pass()
                continue
            number = c["row"]
            c["offset"], c["row"] = where, c["row"] + 1
            c["read"] += 1
            c["in_pass"] += 1
            for col in self.cfg.remove_columns:
                row.pop(col, None)
            return row, number, self._file

    def _end_of_file(self) -> None:
        c = self.cursor
        if self.files is not None and c["file"] + 1 < len(self.files):
            c.update(file=c["file"] + 1, offset=0, row=0)
        else:
            self._new_pass()

    def _new_pass(self) -> None:
        if self.cursor["in_pass"] == 0:
            raise DataError("the source has no rows", source=self.cfg.path)
        self.cursor.update({"pass": self.cursor["pass"] + 1, "file": 0, "offset": 0, "row": 0,
                            "pass_rows": self.cursor["in_pass"], "in_pass": 0})

    def _open(self):
        c = self.cursor
        if self.files is None:
            return self._hub(c["in_pass"])
        self._file = self._order(c["pass"])[c["file"]]
        path = self.files[self._file]
        kind = KINDS[Path(path).suffix.lower()]
        if kind in ("jsonl", "json"):
            with open(path, "rb") as f:
                head = f.read(64).lstrip()
            if kind == "json" and head.startswith(b"["):
                return self._json_list(path, c["offset"])
            return self._jsonl(path, c["offset"])
        if kind == "csv":
            return self._csv(path, c["offset"])
        return self._parquet(path, c["offset"])

    def _jsonl(self, path: str, offset: int):
        with open(path, "rb") as f:
            f.seek(offset)
            line_no = self.cursor["row"]
            while True:
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    try:
                        row = json.loads(line.decode(self.cfg.encoding))
                    except (ValueError, UnicodeDecodeError) as e:
                        raise DataError(f"the line at byte {f.tell() - len(line)} is not valid JSON ({e})",
                                        source=path, hint="fix or delete that line") from None
                    if not isinstance(row, dict):
                        raise DataError(f"row {line_no} is a JSON {type(row).__name__}, expected an object",
                                        source=path)
                    line_no += 1
                    yield row, f.tell()

    def _json_list(self, path: str, offset: int):
        rows = json.loads(Path(path).read_text(encoding=self.cfg.encoding))
        for i in range(offset, len(rows)):
            yield rows[i], i + 1

    def _csv(self, path: str, offset: int):
        with open(path, newline="", encoding=self.cfg.encoding) as f:
            for i, row in enumerate(csv.DictReader(f)):
                if i >= offset:
                    yield dict(row), i + 1

    def _parquet(self, path: str, offset: int):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        start = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start + n > offset:
                rows = pf.read_row_group(g).to_pylist()
                for k in range(max(0, offset - start), n):
                    yield rows[k], start + k + 1
            start += n

    def _hub(self, skip: int):
        import datasets

        try:
            ds = datasets.load_dataset(self.cfg.path, self.cfg.name, split=self.cfg.split, streaming=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a data error naming the source
            raise DataError(f"could not stream the hub dataset: {type(e).__name__}: {str(e).splitlines()[0]}",
                            source=self.cfg.path, hint="check the name and your network") from None
        for i, row in enumerate(ds.skip(skip) if skip else ds):
            yield dict(row), skip + i + 1


def peek_columns(cfg: DataConfig) -> list[str]:
    """The columns of a streamed source's first row."""
    row = next(RowReader(cfg, 0, 0))[0]
    return [c for c in row if c not in cfg.remove_columns]

