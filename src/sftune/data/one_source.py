"""One source end to end, cached: source rows -> formatted segments -> ids + labels -> a report.
(The run's data, one source, a mixture or a stream, is :mod:`sftune.data.chain`.)

``prepare_data`` runs every stage and returns the tokenized train and eval sets as
:class:`TokenizedSet` (flat, memory-mapped token arrays) plus the :class:`DataReport`.
Tokenization is a cached ``datasets.map`` with an explicit fingerprint over the source data, the
tokenizer and the data config, so a re-run with unchanged inputs loads the cached result. Each cached
Arrow file's digest is recorded beside it after writing and checked before it is read
(:func:`trusted_cache`): a damaged cache is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from sftune import __version__
import sftune.data.vision_batch as vision_batch
from sftune.config import TOKENIZATION, DataConfig, keys_with
from sftune.console import console
from sftune.data.examples import ExampleSet
from sftune.data.formats import Format, choose_format
from sftune.data.packing import BatchPlan
from sftune.data.report import DataReport
from sftune.data.sources import Source, check_columns, load_source
from sftune.data.tokenize import RowTokenizer, row_tokenizer
from sftune.digests import SIDECAR, sidecar_check, write_sidecar
from sftune.errors import DataError

_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "weights": datasets.List(datasets.Value("float32")),
    "length": datasets.Value("int32"),
    "n_loss": datasets.Value("int32"),
    "w_loss": datasets.Value("float64"),
    "truncated": datasets.Value("bool"),
    "eos_trained": datasets.Value("bool"),
    "skip": datasets.Value("string"),
    "row": datasets.Value("int64"),
    "extra": datasets.Value("bool"),
    "straddled": datasets.Value("bool"),
    "note": datasets.Value("string"),
})


EXTRA_PREFIX = "extra_"
"""A tokenized dataset's column ``extra_<kind>`` holds its examples' payloads of that kind."""


class TokenizedSet:
    """Kept examples as flat token arrays (zero-copy from the Arrow cache) plus offsets: one
    source's :class:`~sftune.data.examples.ExampleSet`."""

    def __init__(self, ds: datasets.Dataset, kept: np.ndarray):
        table = ds.with_format("arrow")[:]
        ids_col = table.column("input_ids").combine_chunks()
        lab_col = table.column("labels").combine_chunks()
        w_col = table.column("weights").combine_chunks()
        self.ids = ids_col.values.to_numpy(zero_copy_only=False)
        self.labels = lab_col.values.to_numpy(zero_copy_only=False)
        self.weights = w_col.values.to_numpy(zero_copy_only=False)
        offsets = ids_col.offsets.to_numpy()
        kept = np.asarray(kept, dtype=np.int64)
        self.starts = offsets[:-1][kept]
        self.ends = offsets[1:][kept]
        self.rows = np.asarray(table.column("row").to_numpy())[kept]
        self.n_loss = np.asarray(table.column("n_loss").to_numpy())[kept]
        self.w_loss = np.asarray(table.column("w_loss").to_numpy())[kept]
        self.source = np.zeros(len(kept), dtype=np.int64)  # one source
        # unit weights everywhere: the loss is a plain token mean (the fast path)
        self.weighted = bool(len(self.weights)) and not np.all((self.weights == 0) | (self.weights == 1))
        # data beside the tokens (sftune.data.extras): a column "extra_<kind>" per kind
        self._extra_columns = {c[len(EXTRA_PREFIX):]: table.column(c) for c in table.column_names
                               if c.startswith(EXTRA_PREFIX)}
        self._kept = kept
        self.has_extras = bool(self._extra_columns)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def lengths(self) -> np.ndarray:
        return (self.ends - self.starts).astype(np.int64)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.starts[i], self.ends[i]
        return self.ids[s:e], self.labels[s:e]

    def example_weights(self, i: int) -> np.ndarray:
        """Per-token loss weights of example ``i`` (0 where untrained)."""
        return self.weights[self.starts[i]:self.ends[i]]

    @property
    def extra_kinds(self) -> tuple[str, ...]:
        """The kinds of data its examples carry beside their tokens (:mod:`sftune.data.extras`)."""
        return tuple(sorted(self._extra_columns))

    def add_extra(self, kind: str, column, by_example: bool = False) -> None:
        """Attach payloads of ``kind`` (:mod:`sftune.data.extras`) kept outside the tokenized table, such as
        a teacher's saved top-k: ``column`` (Arrow) has one entry per kept example (``by_example``) or per
        table row; a null entry means none."""
        if by_example:
            import pyarrow as pa

            idx = np.full(int(self._kept.max()) + 1 if len(self._kept) else 0, -1, dtype=np.int64)
            idx[self._kept] = np.arange(len(self._kept))
            column = column.take(pa.array(idx, mask=idx < 0))
        self._extra_columns[kind] = column
        self.has_extras = True

    def extras(self, i: int) -> dict:
        """Example ``i``'s data beside its tokens, ``{kind: payload}`` (:mod:`sftune.data.extras`)."""
        row = int(self._kept[i])
        return {kind: col[row].as_py() for kind, col in self._extra_columns.items() if col[row].is_valid}


@dataclass
class PreparedData:
    train: ExampleSet
    """The training examples (a streamed run: the first window only)."""
    eval: ExampleSet | None
    report: DataReport
    eval_report: DataReport | None
    fmt: Format
    source: Source
    max_length: int
    signature: dict | None = None
    """What a mixture's or a stream's data depends on (``sftune.data.position``); None for one source."""
    stream: Callable[[], Any] | None = None
    """A streamed run's fresh :class:`~sftune.data.stream.Stream` of its examples (None in memory:
    ``train`` is then the whole data)."""
    formats: list = field(default_factory=list)
    """Every source's :class:`~sftune.data.formats.Format`, in ``data.sources`` order (a mixture's or a
    stream's; empty for one source: ``fmt``). ``fmt`` is the first."""
    lookups: list = field(default_factory=list)
    """A streamed run's functions ``example -> {kind: payload}`` whose data joins its examples'
    extras when batched (:class:`~sftune.data.examples.ExampleList`): its streams share this list."""


def tokenizer_signature(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary is the identity
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token,
                   getattr(tokenizer, "chat_template", None), tokenizer.all_special_tokens)).encode())
    return h.hexdigest()[:16]


CACHE_VERSION = "v3"
"""The tokenized cache's layout version: bump it when the tokenized columns change meaning."""
TOKENIZATION_KEYS = tuple(k.removeprefix("data.") for k in keys_with(TOKENIZATION))
"""The data keys that change how rows are rendered and tokenized (declared in the schema)."""


def _fingerprint(ds: datasets.Dataset, tok_sig: str, cfg: DataConfig, max_length: int, fmt: Format) -> str:
    payload = json.dumps([ds._fingerprint, tok_sig, {k: getattr(cfg, k) for k in TOKENIZATION_KEYS}, max_length,
                          __version__, type(fmt).__name__, fmt.cache_key(), CACHE_VERSION], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _num_proc(cfg: DataConfig, n_rows: int) -> int | None:
    if cfg.num_proc is not None:
        return cfg.num_proc if cfg.num_proc > 1 else None
    return min(4, os.cpu_count() or 1) if n_rows >= 50_000 else None


def trusted_cache(ds: datasets.Dataset, fp: str) -> None:
    """Remove the cached tokenization of ``fp`` unless each of its Arrow files matches the digest
    recorded when it was written (``.sftune-digest`` beside it): a damaged cache is rebuilt, never read."""
    if not ds.cache_files or not datasets.is_caching_enabled():
        return
    folder = Path(ds.cache_files[0]["filename"]).parent
    for f in sorted(folder.glob(f"cache-{fp}*.arrow")):
        why = sidecar_check(f)
        if why is not None:
            if Path(str(f) + SIDECAR).exists():  # a file without a digest predates them: rebuilt quietly
                console.print(f"note: the tokenized data cache {f} is damaged ({why}): rebuilding it", markup=False,
                              soft_wrap=True)
            for stale in (f, Path(str(f) + SIDECAR)):
                stale.unlink(missing_ok=True)


def tokenize_split(ds: datasets.Dataset, fmt: Format, tokenizer, cfg: DataConfig, max_length: int,
                   source: str) -> datasets.Dataset:
    own = getattr(fmt, "map_function", None)  # a format with no text (sftune.data.pretokenized) maps rows itself
    fn = own(tokenizer, max_length, source) if own else RowTokenizer(fmt, tokenizer, max_length,
                                                                      on_bad_row=cfg.on_bad_row, source=source).table
    fp = _fingerprint(ds, tokenizer_signature(tokenizer), cfg, max_length, fmt)
    trusted_cache(ds, fp)
    quiet = len(ds) < 20_000 and datasets.is_progress_bar_enabled()  # leave a caller's setting as it was
    if quiet:
        datasets.disable_progress_bars()
    try:
        extra = getattr(fmt, "extra_features", None)  # extra_<kind> columns a format fills (sftune.data.extras)
        features = datasets.Features({**_FEATURES, **extra(ds.column_names)}) if extra else _FEATURES
        out = ds.map(fn, batched=True, batch_size=500, remove_columns=ds.column_names, features=features,
                     new_fingerprint=fp, num_proc=_num_proc(cfg, len(ds)), desc="Tokenizing",
                     load_from_cache_file=True)
        for f in out.cache_files:  # what was just written (or verified): its digest, for the next run
            if not Path(f["filename"] + SIDECAR).exists():
                write_sidecar(f["filename"])
        return out
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _report(tok: datasets.Dataset, source: Source, fmt: Format, split: str, max_length: int,
            rows_read: int) -> tuple[DataReport, np.ndarray]:
    t = tok.with_format("arrow")[:]
    skip = np.asarray(t.column("skip").to_pylist(), dtype=object)
    rep = DataReport.from_columns(
        source=source.name, fmt=fmt.name, split=split, max_length=max_length, rows_read=rows_read,
        lengths=t.column("length").to_numpy(), n_loss=t.column("n_loss").to_numpy(),
        truncated=t.column("truncated").to_numpy(zero_copy_only=False),
        eos_trained=t.column("eos_trained").to_numpy(zero_copy_only=False), skip=skip,
        rows=t.column("row").to_numpy(), extra=t.column("extra").to_numpy(zero_copy_only=False),
        straddled=t.column("straddled").to_numpy(zero_copy_only=False),
        notes=np.asarray(t.column("note").to_pylist(), dtype=object),
    )
    if "extra_images" in t.column_names:  # vision data: images and tokens per image (sftune.data.vision_batch)
        rep.images = vision_batch.summary(t.column("extra_images"), skip == "")
    return rep, np.flatnonzero(skip == "")


def prepare_data(cfg: DataConfig, tokenizer, max_length: int, *, source: Source | None = None,
                 fmt: Format | None = None) -> PreparedData:
    """Run the data stages for the train and eval splits.

    ``source`` (rows already loaded) and ``fmt`` (a custom :class:`Format`) replace what
    ``cfg`` would otherwise build; the Python front-ends use them.
    """
    source = source or load_source(cfg)
    columns = [c for c in source.train.column_names if c != "__row__"]
    fmt = fmt or choose_format(cfg, columns, tokenizer)
    what = {"text": "data.text_column", "prompt_completion": "the prompt/completion template",
            "messages": "the messages format"}.get(fmt.name, f"the {fmt.name} format")
    check_columns(source.train, fmt.columns, source.name, what)
    if len(source.train) == 0:
        raise DataError("the training split has no rows", source=source.name)

    tok = tokenize_split(source.train, fmt, tokenizer, cfg, max_length, source.name)
    train_split = getattr(source, "split", None) or cfg.split
    report, kept = _report(tok, source, fmt, train_split, max_length, source.rows_read)
    fmt.review(report)
    if report.kept == 0:
        nothing_to_learn(source.train, fmt, tokenizer, cfg, max_length, report)
        reasons = ", ".join(f"{n} {r}" for r, n in report.skipped.items())
        raise DataError(f"every training example was skipped ({reasons})", source=source.name,
                        hint="check the format settings with 'sftune preview', or raise data.max_length")
    train = TokenizedSet(tok, kept)

    eval_set = eval_report = None
    if source.eval is not None and len(source.eval):
        check_columns(source.eval, fmt.columns, source.name, what)
        etok = tokenize_split(source.eval, fmt, tokenizer, cfg, max_length, source.name)
        split = cfg.eval_split if isinstance(cfg.eval_split, str) else f"{train_split} (held out {cfg.eval_split})"
        eval_report, ekept = _report(etok, source, fmt, split, max_length, len(source.eval))
        fmt.review(eval_report)
        if len(ekept):
            eval_set = TokenizedSet(etok, ekept)
    return PreparedData(train, eval_set, report, eval_report, fmt, source, max_length)


def nothing_to_learn(ds: datasets.Dataset, fmt: Format, tokenizer, cfg: DataConfig, max_length: int,
                     report: DataReport) -> None:
    """When every example was skipped because ``max_length`` ends before its first trained token,
    refuse with the numbers: the shortest prompt and the ``max_length`` it would need."""
    too_long = report.skipped.get("prompt longer than max_length", 0)
    if not too_long:
        return
    sample = ds.select(range(min(len(ds), 2000)))
    out = row_tokenizer(fmt, tokenizer, 10**9, on_bad_row="skip", source="")(sample.to_dict())
    firsts = [next(i for i, lab in enumerate(labels) if lab != -100) for labels, skip in
              zip(out["labels"], out["skip"]) if not skip]
    if not firsts:
        return
    need = min(firsts) + 1
    raise DataError(
        f"data.max_length={max_length} leaves no trained token in any example: {too_long} of {report.rows_used} "
        f"examples were skipped because their prompt fills all {max_length} tokens; the shortest prompt is "
        f"{need - 1} tokens, so the first trained token needs data.max_length >= {need}",
        source=report.source, hint=f"raise data.max_length (the examples' median prompt is "
                                   f"{int(np.median(firsts))} tokens), or shorten the prompts")


def describe_plan(report: DataReport, plan: BatchPlan) -> None:
    """Fill the report's packing / padding figures from a batch plan."""
    report.packing = plan.packing
    report.sequences = len(plan.units)
    if plan.packing:
        real = int(plan.lengths.sum())
        report.fill = real / (len(plan.units) * report.max_length) if len(plan.units) else 0.0
    else:
        report.fill = plan.fill(0)
