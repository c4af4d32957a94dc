"""Sources: load rows from the hub, local files, or the built-in quickstart generator.

Loading goes through ``datasets`` so files and hub data are cached as Arrow; a re-run on unchanged
data reuses the cache. Options applied here, in this order: ``remove_columns``, ``shuffle``, the
eval split (a fraction of rows, or a named split), then ``limit`` / ``eval_limit``.

Every row gets a ``__row__`` column with its index in the data as loaded, so errors can name the
row even after shuffling (for a JSON-lines file, row N is line N + 1).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from sftune.config import DataConfig
from sftune.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_PREFIXES = {"train": "train", "test": "test", "valid": "validation", "validation": "validation",
                   "eval": "validation", "dev": "validation"}


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


def _local_files(path: Path) -> tuple[str, dict[str, list[str]]]:
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
        stem = p.stem.lower()
        split = next((v for k, v in _SPLIT_PREFIXES.items() if stem.startswith(k)), "train")
        splits.setdefault(split, []).append(str(p))
    return kinds.pop(), splits


def read_json_rows(path: str) -> list[dict]:
    """Rows of a JSON-lines file or a JSON list, naming the file and line of the first malformed one."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", source=path)
    text = p.read_text(encoding="utf-8", errors="replace")
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
        if not isinstance(row, dict):
            where = f"line {n}" if n else f"row {i}"
            raise DataError(f"{where} is a JSON {type(row).__name__}, expected an object", source=path,
                            hint="each row must be one JSON object such as {\"text\": \"...\"}")
    return rows


def _load(cfg: DataConfig) -> tuple[datasets.DatasetDict | dict, str]:
    if cfg.path.startswith("builtin:"):
        from sftune import quickstart

        name = cfg.path.split(":", 1)[1]
        if name != "quickstart":
            raise DataError(f"unknown built-in dataset '{cfg.path}'", hint="the built-in dataset is builtin:quickstart")
        return quickstart.make_dataset(), "builtin:quickstart"
    path = Path(cfg.path).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        try:
            return datasets.load_dataset(builder, data_files=files), str(path)
        except Exception as e:  # pyarrow / datasets parse errors
            if builder == "json":  # name the malformed line, if that is what failed
                for f in (f for fs in files.values() for f in fs):
                    read_json_rows(f)
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
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
        eval_ds = with_row_index(_split(dd, cfg.eval_split, name))
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
    train = with_row_index(train)
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
            if {"messages", "conversations"} & set(columns):
                hint += "; this looks like chat data: set data.format=messages"
            elif {"instruction", "output"} <= set(columns):
                hint += "; this looks like Alpaca data (instruction, input, output): set data.template=alpaca"
            raise DataError(f"{what} uses the column '{col}', which does not exist", source=source, column=col,
                            hint=hint)
