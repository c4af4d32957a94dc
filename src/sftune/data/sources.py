"""Sources: load rows from the hub, local files, or the built-in quickstart generator.

Loading goes through ``datasets`` so files and hub data are cached as Arrow; a re-run on unchanged
data reuses the cache. Options applied here, in this order: ``remove_columns``, ``shuffle``, the
eval split (a fraction of rows, or a named split), then ``limit`` / ``eval_limit``.

Every row gets a ``__row__`` column with its index in the data as loaded, so errors can name the
row even after shuffling (for a JSON-lines file, row N is line N + 1).
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from sftune.config import DataConfig
from sftune.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# A file (or the folder it is in) maps to a split only when its name is exactly one of these, or a
# numbered shard of one ("train-00000-of-00002", "test_1"). Every other file is training data.
_SPLIT_NAMES = {"train": "train", "test": "test", "valid": "validation", "validation": "validation",
                "eval": "validation", "dev": "validation"}
_SHARD = re.compile(r"^(?P<name>[a-z]+)(?:[-_.]\d+.*)?$")
INTERNAL_COLUMNS = ("__row__",)


@dataclass
class Source:
    """Loaded rows. ``name`` describes where they came from, for messages."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    name: str
    rows_read: int
    split: str | None = None
    """The split the training rows came from, when it is not ``data.split`` (a single local file is
    its own split, whatever ``data.split`` says)."""


def local_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"unsupported file type '{path.suffix}'", source=str(path),
                            hint=f"use one of {', '.join(BUILDERS)}")
        return builder, {"train": [str(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not files:
        raise DataError(f"no {', '.join(BUILDERS)} files in this directory", source=str(path))
    kinds = {BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) > 1:
        raise DataError(f"the directory mixes file types ({', '.join(sorted(kinds))})", source=str(path),
                        hint="keep one kind of file per dataset directory")
    splits: dict[str, list[str]] = {}
    for p in files:
        splits.setdefault(_split_of(p, path), []).append(str(p))
    from sftune.console import console

    mapping = "; ".join(f"{split} ← {', '.join(str(Path(f).relative_to(path)) for f in fs)}"
                        for split, fs in splits.items())
    console.print(f"data directory {path}: {mapping}", highlight=False, markup=False, soft_wrap=True)
    return kinds.pop(), splits


def _split_of(file: Path, root: Path) -> str:
    """The split a directory's file belongs to: its name, or its folder's, is exactly a split name."""
    for name in [file.stem, *(q.name for q in file.relative_to(root).parents if q.name)]:
        m = _SHARD.match(name.lower())
        if m and m.group("name") in _SPLIT_NAMES:
            return _SPLIT_NAMES[m.group("name")]
    return "train"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1].strip() if lines else type(e).__name__


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause (datasets wraps the reader's own error in 'An error occurred ...')."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def check_text_file(path: Path, encoding: str) -> None:
    """Refuse, naming the file, an unreadable or empty file, or bytes that are not ``encoding``
    (with the byte offset and line); parquet files are only opened."""
    try:
        with path.open("rb") as f:
            if path.suffix.lower() == ".parquet":
                if not f.read(4):
                    raise DataError("the file is empty", source=str(path))
                return
            try:
                decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
            except LookupError:
                raise DataError(f"data.encoding={encoding!r} is not a known text encoding",
                                hint="use for example utf-8, latin-1, cp1252 or utf-16") from None
            offset, lines, text_seen = 0, 1, False
            while chunk := f.read(1 << 22):
                try:
                    text_seen |= bool(decoder.decode(chunk).strip())
                except UnicodeDecodeError as e:
                    bad = offset + e.start
                    line = lines + chunk[:e.start].count(b"\n")
                    raise DataError(
                        f"the file is not valid {encoding}: byte {bad} (line {line}) is 0x{chunk[e.start]:02x}",
                        source=str(path),
                        hint="convert the file to UTF-8, or set data.encoding to its encoding "
                             "(for example data.encoding=latin-1 or data.encoding=cp1252)") from None
                offset += len(chunk)
                lines += chunk.count(b"\n")
            try:
                text_seen |= bool(decoder.decode(b"", final=True).strip())
            except UnicodeDecodeError:
                raise DataError(f"the file is not valid {encoding}: it ends inside a character (byte {offset})",
                                source=str(path), hint="the file may be cut short; or set data.encoding") from None
    except PermissionError:
        raise DataError("cannot read the file: permission denied", source=str(path),
                        hint="fix its permissions (chmod +r) or copy it somewhere readable") from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", source=str(path)) from None
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", source=str(path)) from None
    if not text_seen:
        raise DataError("the file is empty", source=str(path), hint="point data.path at a file with rows")


def check_csv_file(path: Path, encoding: str) -> None:
    """Header and field counts: a row with more fields than the header is an error naming its
    line (pandas would silently turn its first field into an index); a header alone has no rows."""
    with path.open(newline="", encoding=encoding) as f:
        reader = csv.reader(f)
        try:
            header = next((r for r in reader if r), None)
            if header is None:
                raise DataError("the file is empty", source=str(path))
            rows = 0
            for row in reader:
                if not row:
                    continue
                rows += 1
                if len(row) > len(header):
                    raise DataError(
                        f"line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                        f"({', '.join(header)})", source=str(path),
                        hint="quote fields that contain commas (\"a, b\"), or fix the header")
        except csv.Error as e:
            raise DataError(f"line {reader.line_num}: {e}", source=str(path),
                            hint="check the quoting on that line") from None
    if rows == 0:
        raise DataError(f"the file has a header ({', '.join(header)}) but no data rows", source=str(path))


def read_json_rows(path: str, encoding: str = "utf-8") -> list[dict]:
    """Rows of a JSON-lines file or a JSON list, naming the file and line of the first malformed one."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", source=path)
    check_text_file(p, encoding)
    text = p.read_text(encoding=encoding)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", source=path,
                            hint="fix the file (a JSON list of objects, or one object per line)") from None
        lines = [None] * len(rows)
    else:
        rows, lines = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"line {n} is not valid JSON ({e.msg} at column {e.colno})", source=path,
                                hint="fix or delete that line; each line must be one JSON object") from None
            lines.append(n)
    for i, (row, n) in enumerate(zip(rows, lines)):
        where = f"line {n}" if n else f"row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {type(row).__name__}, expected an object", source=path,
                            hint="each row must be one JSON object such as {\"text\": \"...\"}")
        if (key := _lone_surrogate(row)) is not None:
            raise DataError(f"{where} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair) "
                            f"in the value of '{key}': that is not a character, and the JSON reader refuses it",
                            source=path, column=key,
                            hint="fix that escape: a character beyond U+FFFF is written as a pair such as "
                                 "\\ud83d\\ude00, or as the character itself; or delete that row")
    return rows


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value, key: str | None = None) -> str | None:
    """The key whose string holds a lone surrogate (json.loads joins a valid pair into one character,
    so any surrogate left is a lone one), or ``None``."""
    if isinstance(value, str):
        return key or "?" if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and _SURROGATE.search(k):
            return k
        found = _lone_surrogate(v, key or str(k))
        if found is not None:
            return found
    return None


def _columns_of(file: Path, builder: str, encoding: str) -> list[str] | None:
    """The columns of a data file as its first row (JSON), header (CSV) or schema (parquet) has them."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return sorted(pq.read_schema(file).names)
        if builder == "csv":
            with file.open(newline="", encoding=encoding) as f:
                return sorted(next(csv.reader(f), []))
        rows = read_json_rows(str(file), encoding)
        return sorted(rows[0]) if rows else None
    except (DataError, OSError, ValueError):
        return None


def check_same_columns(files: dict[str, list[str]], builder: str, encoding: str, source: str) -> None:
    """Refuse, naming two shards and their columns, a directory whose files have different columns."""
    for split, fs in files.items():
        if len(fs) < 2:
            continue
        seen: dict[tuple, str] = {}
        for f in fs:
            cols = _columns_of(Path(f), builder, encoding)
            if cols is not None:
                seen.setdefault(tuple(cols), f)
        if len(seen) > 1:
            (a_cols, a), (b_cols, b) = list(seen.items())[:2]
            only_a, only_b = sorted(set(a_cols) - set(b_cols)), sorted(set(b_cols) - set(a_cols))
            raise DataError(
                f"the {split} shards have different columns: {Path(a).name} has {', '.join(a_cols)}; "
                f"{Path(b).name} has {', '.join(b_cols)}"
                + (f" ({', '.join(only_a)} only in the first" if only_a else " (")
                + (f"{'; ' if only_a else ''}{', '.join(only_b)} only in the second)" if only_b else ")"),
                source=source, hint="give every shard the same columns (rename them), or move the odd shards "
                                    "out of the directory")


def _load(cfg: DataConfig) -> tuple[datasets.DatasetDict | dict, str]:
    if cfg.path.startswith("builtin:"):
        from sftune import quickstart, quickstart_vision

        name = cfg.path.split(":", 1)[1]
        makers = {"quickstart": quickstart.make_dataset, "quickstart-noisy": quickstart.make_noisy_dataset,
                  "quickstart-vision": quickstart_vision.make_dataset}
        if name not in makers:
            raise DataError(f"unknown built-in dataset '{cfg.path}'",
                            hint="the built-in datasets are " + ", ".join(f"builtin:{m}" for m in makers))
        return makers[name](), cfg.path
    path = Path(cfg.path).expanduser()
    if path.exists():
        builder, files = local_files(path)
        for f in (Path(f) for fs in files.values() for f in fs):
            check_text_file(f, cfg.encoding)
            if builder == "csv":
                check_csv_file(f, cfg.encoding)
        kwargs = {"encoding": cfg.encoding} if builder in ("csv", "json") and cfg.encoding != "utf-8" else {}
        try:
            return datasets.load_dataset(builder, data_files=files, **kwargs), str(path)
        except Exception as e:  # pyarrow / datasets parse errors
            if builder == "json":  # name the malformed line, if that is what failed
                for f in (f for fs in files.values() for f in fs):
                    read_json_rows(f, encoding=cfg.encoding)
            check_same_columns(files, builder, cfg.encoding, str(path))  # shards that disagree: name two
            cause = _root_cause(e)
            msg = f"{type(cause).__name__}: {_first_line(cause)}" if cause is not e else _first_line(e)
            raise DataError(f"could not read the data: {msg}", source=str(path),
                            hint="check that every row has the same columns with the same types") from None
    if cfg.path.endswith(tuple(BUILDERS)) or cfg.path.startswith((".", "/", "~")):
        raise DataError("file not found", source=cfg.path, hint="check data.path")
    try:
        return datasets.load_dataset(cfg.path, cfg.name), cfg.path
    except Exception as e:
        raise DataError(
            f"could not load the hub dataset: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            source=cfg.path,
            hint="check the name and your network; offline, point data.path at a local .json/.jsonl/.csv/.parquet file",
        ) from None


def _split(dd, split: str, source: str) -> datasets.Dataset:
    if split not in dd:
        raise DataError(f"there is no split '{split}'; the splits are {', '.join(dd)}", source=source,
                        hint="set data.split (or data.eval_split) to one of them")
    return dd[split]


def with_row_index(ds: datasets.Dataset) -> datasets.Dataset:
    if "__row__" in ds.column_names:
        return ds
    return _add_row_index(ds)


def check_reserved_columns(ds: datasets.Dataset, source: str) -> None:
    """A user column named like one of sftune's internal columns is refused, not silently reused."""
    for col in INTERNAL_COLUMNS:
        if col in ds.column_names:
            raise DataError(f"the column '{col}' is reserved for sftune's own use (the row index)", source=source,
                            column=col, hint=f"rename it, or drop it with data.remove_columns=[{col}]")


def _add_row_index(ds: datasets.Dataset) -> datasets.Dataset:
    return ds.add_column("__row__", np.arange(len(ds), dtype=np.int64),
                         new_fingerprint=f"{ds._fingerprint}-row-index")


def load_source(cfg: DataConfig) -> Source:
    """Load, select and split rows as configured."""
    dd, name = _load(cfg)
    split = None
    if cfg.split not in dd and len(dd) == 1 and Path(name).is_file():
        split, train = next(iter(dd.items()))  # a single file is its own (only) split, whatever data.split says
    else:
        train = _split(dd, cfg.split, name)
    rows_read = len(train)
    eval_ds = None
    if isinstance(cfg.eval_split, str):
        eval_ds = _split(dd, cfg.eval_split, name)
    for col in cfg.remove_columns:
        if col not in train.column_names:
            match = difflib.get_close_matches(col, train.column_names, n=1)
            raise DataError(
                f"data.remove_columns names '{col}', which is not a column", source=name,
                hint=f"the columns are {train.column_names}" + (f"; did you mean '{match[0]}'?" if match else
                                                                 "; data.remove_columns=[] removes none"),
            )
    if cfg.remove_columns:
        train = train.remove_columns(cfg.remove_columns)
        if eval_ds is not None:
            eval_ds = eval_ds.remove_columns([c for c in cfg.remove_columns if c in eval_ds.column_names])
    for ds in (train, eval_ds):
        if ds is not None:
            check_reserved_columns(ds, name)
    train = _add_row_index(train)
    eval_ds = None if eval_ds is None else _add_row_index(eval_ds)
    if cfg.shuffle:
        train = train.shuffle(seed=cfg.seed)
    if isinstance(cfg.eval_split, float):
        n_eval = max(1, int(round(len(train) * cfg.eval_split)))
        if n_eval >= len(train):
            raise DataError(f"data.eval_split={cfg.eval_split} leaves no training rows", source=name)
        # The held-out rows come from the end, so `limit` keeps the tutorials' "first N rows".
        eval_ds = train.select(range(len(train) - n_eval, len(train)))
        train = train.select(range(len(train) - n_eval))
    if cfg.limit is not None:
        train = train.select(range(min(cfg.limit, len(train))))
    if eval_ds is not None and cfg.eval_limit is not None:
        eval_ds = eval_ds.select(range(min(cfg.eval_limit, len(eval_ds))))
    return Source(train=train, eval=eval_ds, name=name, rows_read=rows_read, split=split)


def check_columns(ds: datasets.Dataset, needed: list[str], source: str, what: str) -> None:
    """Fail early, naming the closest existing column, when a needed column is missing."""
    columns = [c for c in ds.column_names if c != "__row__"]
    for col in needed:
        if col not in columns:
            match = difflib.get_close_matches(col, columns, n=1)
            hint = f"the columns are {columns}" + (f"; did you mean '{match[0]}'?" if match else "")
            if columns == ["text"] and _json_list_of_strings(source):
                raise DataError(f"the file is a JSON list of plain strings, not of rows: {what} needs the column "
                                f"'{col}'", source=source, column=col,
                                hint=f"write each row as an object with the columns, e.g. "
                                     f"[{{\"{col}\": \"...\", ...}}]; for plain text, "
                                     f"[{{\"text\": \"...\"}}] with data.format=text")
            if {"messages", "conversations"} & set(columns):
                hint += "; this looks like chat data: set data.format=messages"
            elif {"instruction", "output"} <= set(columns):
                hint += "; this looks like Alpaca data (instruction, input, output): set data.template=alpaca"
            raise DataError(f"{what} uses the column '{col}', which does not exist", source=source, column=col,
                            hint=hint)


def _json_list_of_strings(source: str) -> bool:
    """Whether ``source`` is a local JSON file holding a list whose first item is a string."""
    p = Path(source)
    if not (p.is_file() and p.suffix.lower() == ".json"):
        return False
    try:
        with p.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16).lstrip()
    except OSError:
        return False
    return head.startswith("[") and head[1:].lstrip().startswith('"')
