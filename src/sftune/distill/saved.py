"""The saved path: the teacher runs once (``sftune distill-prepare``); training reads its top-k.

:func:`prepare_saved` tokenizes the data exactly as training will, runs the teacher over the kept
training examples and writes, for every trained position (each loss position, in order), the
teacher's ``k`` most likely token ids and their log-probabilities at temperature 1 (sorted, most
likely first), plus the log-probability of the data's token (the teacher's own cross-entropy, for
the logs). Shards of ``distill.prepare_shard_size`` examples are Arrow datasets
(``shards/shard-NNNNN``, written to a temporary name and renamed: a shard that exists is whole), so
a rerun skips the finished shards. ``manifest.json`` records the teacher, k and a fingerprint of the
tokenized data; training refuses saved rows made for other data.

A mixture (``data.sources``) tokenizes each source on its own before drawing from it, so the rows
are written per source: ``sources/NN-<name>/`` holds one source's ``manifest.json`` and shards (a
one-source saved directory), and the top ``manifest.json`` lists the sources with their
fingerprints. Training finds each source's rows by its fingerprint and attaches them to that
source's tokenized set; the mixture passes them through, so every drawn example (in any pass,
order, weight or seed of the mixture) carries its own rows, and one prepared directory serves any
weights. A stream (``data.streaming``, one source or several) keys its rows by each example's
source file, row and part instead, checked per example by a hash of its tokens
(:mod:`sftune.distill.saved_stream`); the directories are laid out the same way.

:func:`attach_saved` adds the rows to the run's tokenized set as the ``teacher`` kind of the data
seam (:mod:`sftune.data.extras`); :func:`collate_teacher` turns a micro-batch's payloads into
``Batch.loss_extras`` (``teacher_ids``, ``teacher_logprobs`` ``[n_loss, k]``, ``teacher_valid``,
``teacher_target_logprob``), one row per loss position in ``loss_index`` order, which the
divergence reads (:func:`sftune.distill.objective.saved_rows`).

A pre-tokenized dataset in Axolotl's KD layout (``target_token_ids``, ``target_logprobs``,
``target_mask``: one row per input position, row ``p`` for the token at ``p``) carries the same
payload from its columns (:mod:`sftune.data.pretokenized`); it loads as it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

import sftune.data.extras as data_extras
import sftune.distill.saved_stream as saved_stream  # not "from sftune.distill import": the package imports this module
from sftune.data.tokenize import IGNORE
from sftune.errors import ConfigError

KIND = saved_stream.KIND
VERSION = 1
PREPARE_BATCH = 16
"""Examples per teacher forward in ``sftune distill-prepare`` (one per row, padded right, without
``position_ids``: the model numbers positions itself, as when called alone; checked at load)."""


def data_fingerprint(train) -> str:
    """What the saved rows depend on: the kept examples' token ids and labels, in order."""
    h = hashlib.sha256()
    for i in range(len(train)):
        ids, labels = train.example(i)
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b";")
    return h.hexdigest()[:32]


def collate_teacher(placed: list, batch) -> None:
    """The ``teacher`` kind's collator: payload rows, in batch order, become ``loss_extras``."""
    ks = {len(row) for p in placed for row in p.payload["ids"][:1]}
    if len(ks) > 1:
        raise ConfigError("saved teacher rows with different k in one batch: prepare the data with one k")
    k = ks.pop() if ks else 1
    ids = [torch.as_tensor(p.payload["ids"], dtype=torch.long).reshape(-1, k) for p in placed]
    lps = [torch.as_tensor(p.payload["logprobs"], dtype=torch.float32).reshape(-1, k) for p in placed]
    n = sum(x.shape[0] for x in ids)
    if n != batch.n_loss:
        raise ConfigError(f"the saved teacher rows ({n}) do not match the batch's {batch.n_loss} trained positions: "
                          "every example needs the rows of all its trained positions (rerun sftune distill-prepare "
                          "for this data and config)")
    extra = len(batch.loss_index) - n  # bucketed slots (weight 0)
    out = {"teacher_ids": torch.cat(ids + [torch.zeros(extra, k, dtype=torch.long)]),
           "teacher_logprobs": torch.cat(lps + [torch.zeros(extra, k)])}
    if any(p.payload.get("valid") is not None for p in placed):
        valid = [torch.as_tensor(p.payload["valid"], dtype=torch.bool).reshape(-1, k) if p.payload.get("valid")
                 is not None else torch.ones(x.shape[0], k, dtype=torch.bool) for p, x in zip(placed, ids)]
        out["teacher_valid"] = torch.cat(valid + [torch.ones(extra, k, dtype=torch.bool)])
    if all(p.payload.get("target") is not None for p in placed):
        out["teacher_target_logprob"] = torch.cat([torch.as_tensor(p.payload["target"], dtype=torch.float32)
                                                   for p in placed] + [torch.zeros(extra)])
    batch.loss_extras.update(out)


data_extras.register(KIND, collate_teacher)


def _shards(out: Path, n: int, size: int) -> list[Path]:
    return [out / "shards" / f"shard-{s:05d}" for s in range(math.ceil(n / size))]


def source_sets(data) -> list[tuple[str, object]]:
    """``(label, tokenized set)`` of each source of the run's prepared data, in ``data.sources`` order
    (one source: itself). The saved rows belong to these sets: the mixture only draws from them."""
    parts = getattr(data.train, "parts", None)
    if parts is None:
        return [(data.report.source, data.train)]
    return [(entry["label"], part) for entry, part in zip(data.report.sources, parts)]


def _source_dir(i: int, label: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(label.rstrip("/")).name or label).strip("._")[:60] or "source"
    return f"sources/{i:02d}-{name}"


def _start_dir(out: Path, manifest: dict) -> None:
    """Write ``out/manifest.json``, after refusing a directory that holds rows made with other settings."""
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if {k: old.get(k) for k in manifest} != manifest:
            diff = [k for k in manifest if old.get(k) != manifest[k]]
            raise ConfigError(f"{out} holds saved teacher rows made with other settings ({', '.join(diff)} "
                              "differ): give another --out, or delete it")
    out.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest, indent=2))


def _refuse_extras(sets: list) -> None:
    """A text teacher's rows for examples that carry other data (images) would ignore it: refused."""
    for label, train in sets:
        if not getattr(train, "has_extras", False) or set(getattr(train, "extra_kinds", ("?",))) <= {KIND}:
            continue
        for i in range(len(train)):
            other = sorted(set(train.extras(i)) - {KIND})
            if other:
                rows = getattr(train, "rows", None)
                row = f" (row {int(rows[i])})" if rows is not None and i < len(rows) else ""
                raise ConfigError(f"source {label!r}, example {i}{row} carries {', '.join(other)} beside its tokens: "
                                  "sftune distill-prepare runs a text teacher over the tokens alone (use the live "
                                  "teacher: distill.teacher without distill.saved)")


def _other_data(saved: str, manifest: dict, entries: list, what: str) -> ConfigError:
    """The refusal of a run's source that none of the saved sources matches (``what``: why, in words)."""
    made = ", ".join(repr(e["label"]) for e in entries) if "sources" in manifest else "one other source"
    return ConfigError(f"distill.saved={saved} was prepared for other data: none of its sources ({made}) {what}: "
                       "rerun sftune distill-prepare with this config")


def prepare_saved(cfg, out_dir: str, console=None) -> dict:
    """``sftune distill-prepare``: run ``distill.teacher`` over the run's training examples once and
    write their top-k rows to ``out_dir`` (resumable). Returns the manifest.

    One source: ``out_dir`` holds ``manifest.json`` and ``shards/``. A mixture (``data.sources``):
    each source's kept examples, tokenized on their own as training tokenizes them, get such a
    directory under ``out_dir/sources/NN-<name>/``, listed with their fingerprints in
    ``out_dir/manifest.json``; the rows do not depend on the weights, the seed or the order of the
    mixture (training finds each source's rows by its fingerprint). A stream (``data.streaming``):
    the same layout, each source's first pass keyed by row (:mod:`sftune.distill.saved_stream`)."""
    from sftune.data.chain import prepare
    from sftune.distill.teacher import load_teacher
    from sftune.model import load_model_config, load_tokenizer, resolve_max_length
    from sftune.probe import PADDED, probe_examples

    d = cfg.distill
    if not d.teacher:
        raise ConfigError("sftune distill-prepare needs distill.teacher=DIR (the teacher to run)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, _ = load_tokenizer(cfg)
    max_length = resolve_max_length(cfg, tokenizer, load_model_config(cfg))
    data = prepare(cfg.data, tokenizer, max_length, seed=cfg.train.seed)
    if data.stream is None:
        _refuse_extras(source_sets(data))  # a stream's examples are checked as they are read
    teacher = load_teacher(d.teacher, tokenizer, len(tokenizer), device, d.teacher_dtype, PADDED,
                           probe_examples(data.train), cfg.model.check)  # checked as it runs here
    out = Path(out_dir)
    head = {"version": VERSION, "teacher": teacher.path, "k": d.prepare_top_k}
    tail = {"shard_size": d.prepare_shard_size, "vocab": len(tokenizer), "max_length": max_length}
    if data.stream is not None:
        return _prepare_streamed(cfg, data, out, {**head, **tail, "streamed": True}, teacher, tokenizer, device,
                                 console)
    sets = source_sets(data)
    if not cfg.data.sources:
        train = sets[0][1]
        manifest = {**head, "examples": len(train), **tail, "fingerprint": data_fingerprint(train)}
        _start_dir(out, manifest)
        _write_source(train, out, manifest, teacher, tokenizer, device, console)
        return manifest
    entries, dirs = [], {}
    for i, (label, train) in enumerate(sets):
        fp = data_fingerprint(train)
        dirs.setdefault(fp, _source_dir(i, label))  # a source listed twice is run once
        entries.append({"label": label, "dir": dirs[fp], "examples": len(train), "fingerprint": fp})
    manifest = {**head, **tail, "sources": entries}
    _start_dir(out, manifest)
    written = set()
    for (label, train), entry in zip(sets, entries):
        if entry["dir"] in written:
            continue
        written.add(entry["dir"])
        if console is not None:
            console.print(f"source {label}: {len(train)} examples", markup=False)
        one = {**head, "examples": len(train), **tail, "fingerprint": entry["fingerprint"]}
        _start_dir(out / entry["dir"], one)
        _write_source(train, out / entry["dir"], one, teacher, tokenizer, device, console)
    return manifest


def _write_source(train, out: Path, manifest: dict, teacher, tokenizer, device, console) -> None:
    """One tokenized set's rows in ``out/shards/shard-NNNNN`` (finished shards skipped; :func:`_start_dir` wrote
    ``out/manifest.json``)."""
    import datasets

    size = manifest["shard_size"]
    k = min(manifest["k"], len(tokenizer))
    shards = _shards(out, len(train), size)
    done = 0
    for s, path in enumerate(shards):
        if path.exists():
            done += 1
            continue
        lo, hi = s * size, min(len(train), (s + 1) * size)
        rows = _teacher_rows([train.example(i) for i in range(lo, hi)], teacher, tokenizer, device, k)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_dict(rows, features=datasets.Features({
            "ids": datasets.List(datasets.List(datasets.Value("int32"))),
            "logprobs": datasets.List(datasets.List(datasets.Value("float32"))),
            "target": datasets.List(datasets.Value("float32"))})).save_to_disk(str(tmp))
        tmp.rename(path)
        if console is not None:
            console.print(f"shard {s + 1}/{len(shards)}: examples {lo}-{hi - 1}", markup=False)
    if console is not None:
        console.print(f"saved the teacher's top {k} at every trained position of {len(train)} examples to {out} "
                      f"({len(shards)} shards, {done} already there)", markup=False)


def _teacher_rows(examples: list, teacher, tokenizer, device, k: int) -> dict[str, list]:
    """The teacher's top-k ids and log-probabilities and the target's log-probability at each loss
    position of each ``(ids, labels)`` example, in order: one list per example and column."""
    from sftune.data.packing import collate

    rows = {"ids": [], "logprobs": [], "target": []}
    per = PREPARE_BATCH if teacher.lm.fused else 1  # its own logits: [one example's positions, vocab] at a time
    for g in range(0, len(examples), per):
        group = [(ex[0], ex[1]) for ex in examples[g:g + per]]
        batch = collate([[ex] for ex in group], tokenizer.pad_token_id or 0)
        chunk = teacher.rows({**batch.inputs(device), "doc_bounds": None, "model_inputs": None})
        got = {"ids": [], "logprobs": [], "target": []}
        for a in range(0, batch.n_loss, 256):
            c = chunk(a, min(batch.n_loss, a + 256))
            top = torch.log_softmax(c.logits.float(), -1).topk(k, -1)  # sorted, most likely first
            got["ids"].append(top.indices.int().cpu())
            got["logprobs"].append(top.values.cpu())
            got["target"].append((-c.ce.float()).cpu())
        got = {key: torch.cat(v) for key, v in got.items()}
        start = 0
        for ids, labels in group:  # each example's loss positions, in order (as collate finds them)
            n = int((np.asarray(labels[1:]) != IGNORE).sum())
            for key in rows:
                rows[key].append(got[key][start:start + n].tolist())
            start += n
    return rows


def _prepare_streamed(cfg, data, out: Path, head: dict, teacher, tokenizer, device, console) -> dict:
    """``prepare_saved`` over a stream: each source's first pass, keyed by row (:mod:`.saved_stream`)."""
    stream = data.stream()
    k = min(head["k"], len(tokenizer))
    entries, dirs, limits = [], {}, {}
    for i, spec in enumerate(stream.specs):
        fp = saved_stream.fingerprint(stream, i)
        dirs.setdefault(fp, _source_dir(i, spec.label) if cfg.data.sources else ".")
        entries.append({"label": spec.label, "dir": dirs[fp], "fingerprint": fp})
        longest = limits.get(fp, 0)  # a source listed twice with two limits: the longer pass serves both
        limits[fp] = None if spec.cfg.limit is None or longest is None else max(longest, spec.cfg.limit)
    if cfg.data.sources:
        manifest = {**head, "sources": entries}
        _start_dir(out, manifest)
    written = set()
    for i, (spec, entry) in enumerate(zip(stream.specs, entries)):
        if entry["dir"] in written:
            continue
        written.add(entry["dir"])
        limit = limits[entry["fingerprint"]]
        one = {**head, "fingerprint": entry["fingerprint"], "limit": limit, "files": saved_stream.file_names(spec)}
        _start_dir(out / entry["dir"], one)
        saved_stream.write_source(stream, i, out / entry["dir"], head["shard_size"],
                                  lambda exs: _teacher_rows(exs, teacher, tokenizer, device, k), console, limit)
    return manifest if cfg.data.sources else one


def _attach_streamed(saved: str, out: Path, manifest: dict, data) -> None:
    """``attach_saved`` for a stream: each source's rows (found by fingerprint in a mixture) become a
    lookup of its streams' batches; the first window is looked up now (a mismatch shows at once)."""
    from sftune.data.examples import ExampleList

    if not manifest.get("streamed"):
        raise ConfigError(f"distill.saved={saved} was prepared from in-memory data, and this run streams "
                          "(data.streaming=true): prepare it with data.streaming=true, or train without streaming")
    stream = data.stream()
    entries = manifest.get("sources") or [{"label": None, "dir": ".", "fingerprint": manifest["fingerprint"]}]
    rows, files = [], []
    for i, spec in enumerate(stream.specs):
        # one source to one directory: no fingerprint (its examples are checked one by one, naming the first
        # that differs); a mixture finds each source's directory by its fingerprint
        fp = saved_stream.fingerprint(stream, i) if len(entries) > 1 or len(stream.specs) > 1 else None
        entry = entries[0] if fp is None else next((e for e in entries if e["fingerprint"] == fp), None)
        if entry is None:
            raise _other_data(saved, manifest, entries, f"starts with the examples of this run's streamed source "
                              f"{spec.label!r} (its files, data, tokenizer, format or max_length changed)")
        one = _source_manifest(out, entry, manifest, saved)
        _check_files(saved, spec, one["files"])
        if one["limit"] is not None and (spec.cfg.limit or 1 << 62) > one["limit"]:
            each = " of each file" * (len(one["files"]) > 1)
            raise ConfigError(f"distill.saved={saved}: {out / entry['dir']} holds the first {one['limit']} rows{each} "
                              f"of source {spec.label!r}, and this run reads {spec.cfg.limit or 'all its'} rows a "
                              "pass: prepare it with this data.limit")
        if not (out / entry["dir"] / saved_stream.DONE).exists():
            raise ConfigError(f"distill.saved={saved} is incomplete (source {spec.label!r} was not finished in "
                              f"{out / entry['dir']}): rerun sftune distill-prepare with the same --out to finish it")
        done = json.loads((out / entry["dir"] / saved_stream.DONE).read_text())
        rows.append(saved_stream.SavedRows(out / entry["dir"], done))
        files.append(one["files"])
    find = saved_stream.lookup(saved, [s.label for s in stream.specs], files, rows)
    for i in range(len(stream.specs)):
        saved_stream.check_head(stream, i, find)
    data.lookups.append(find)
    data.train = ExampleList(data.train.items, data.lookups)
    for i in range(len(data.train)):  # the first window: a saved directory for other data is refused here
        data.train.extras(i)


def _check_files(saved: str, spec, files: list[str]) -> None:
    """A source's saved rows are keyed by each file's place among its files: other files are refused."""
    now = saved_stream.file_names(spec)
    if now == files:
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    added, gone = [f for f in now if f not in files], [f for f in files if f not in now]
    what = "; ".join([f"added: {some(added)}"] * bool(added) + [f"missing: {some(gone)}"] * bool(gone)) \
        or "the same files in another order"
    raise ConfigError(f"distill.saved={saved} was prepared for other files of source {spec.label!r} ({what}; its "
                      "rows are keyed by each file's place among the source's files): rerun sftune distill-prepare "
                      "with this config")


def _source_manifest(out: Path, entry: dict, manifest: dict, saved: str) -> dict:
    """The manifest of the source directory ``entry`` names, refused unless it is the one listed."""
    one = _read_manifest(out / entry["dir"], saved)
    if one["k"] != manifest["k"] or one.get("fingerprint") != entry["fingerprint"]:
        raise ConfigError(f"distill.saved={saved}: {out / entry['dir']} does not match its manifest.json: "
                          "rerun sftune distill-prepare with another --out")
    return one


def _read_manifest(out: Path, saved: str) -> dict:
    mpath = out / "manifest.json"
    if not mpath.exists():
        raise ConfigError(f"distill.saved={saved} holds no saved top-k (no manifest.json): write it with "
                          "sftune distill-prepare RECIPE distill.teacher=DIR --out DIR")
    return json.loads(mpath.read_text())


def attach_saved(saved: str, data, tokenizer) -> tuple[int, dict]:
    """Add the saved rows in ``saved`` to the run's training examples as the ``teacher`` kind:
    ``(k, description)``. A mixture's rows go to each source's tokenized set (found by its
    fingerprint), so every drawn example, in any pass or order, carries its own rows."""
    out = Path(saved)
    manifest = _read_manifest(out, saved)
    if manifest["vocab"] != len(tokenizer):
        raise ConfigError(f"distill.saved={saved} was prepared with a {manifest['vocab']}-token tokenizer; this run's "
                          f"has {len(tokenizer)}: prepare it with the student's tokenizer")
    if getattr(data, "stream", None) is not None:
        if manifest["max_length"] != data.max_length:
            raise ConfigError(f"distill.saved={saved} was prepared for other data (max_length {manifest['max_length']}"
                              f"; this run's is {data.max_length}): rerun sftune distill-prepare with this config")
        _attach_streamed(saved, out, manifest, data)
    else:
        _attach_in_memory(saved, out, manifest, data)
    k = manifest["k"]
    return k, {"teacher": manifest["teacher"], "how": "saved", "saved": str(out), "saved_k": k}


def _attach_in_memory(saved: str, out: Path, manifest: dict, data) -> None:
    """``attach_saved`` for in-memory data: each source's rows (found by fingerprint) join its tokenized set."""
    if manifest.get("streamed"):
        raise ConfigError(f"distill.saved={saved} was prepared from a stream (data.streaming=true): train with "
                          "data.streaming=true, or prepare it again without streaming")
    if not all(hasattr(part, "add_extra") for _, part in source_sets(data)):
        raise ConfigError("distill.saved needs the training data tokenized by sftune (data.path or data.sources)")
    entries = manifest.get("sources") or [{"label": None, "dir": ".", "examples": manifest["examples"],
                                           "fingerprint": manifest["fingerprint"]}]
    sets = source_sets(data)
    for label, train in sets:
        fp = data_fingerprint(train)
        entry = next((e for e in entries if e["fingerprint"] == fp and e["examples"] == len(train)), None)
        if entry is None and len(sets) == 1 and "sources" not in manifest:
            raise ConfigError(f"distill.saved={saved} was prepared for other data (the tokenized examples differ: "
                              "data, tokenizer, format or max_length changed): rerun sftune distill-prepare with "
                              "this config")
        if entry is None:
            raise _other_data(saved, manifest, entries, f"has the tokenized examples of this run's source {label!r} "
                              "(its data, tokenizer, format or max_length changed)")
        one = _source_manifest(out, entry, manifest, saved)  # entry's fingerprint is fp
        train.add_extra(KIND, _load_rows(out / entry["dir"], one, saved), by_example=True)


def _load_rows(out: Path, manifest: dict, saved: str):
    """One source's saved rows, one Arrow struct per kept example (``ids``, ``logprobs``, ``target``)."""
    import datasets
    import pyarrow as pa

    shards = _shards(out, manifest["examples"], manifest["shard_size"])
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise ConfigError(f"distill.saved={saved} is incomplete ({len(missing)} of {len(shards)} shards of {out} "
                          f"missing, e.g. {missing[0]}): rerun sftune distill-prepare with the same --out to finish it")
    table = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards]).with_format("arrow")[:]
    return pa.StructArray.from_arrays([table.column(c).combine_chunks() for c in ("ids", "logprobs", "target")],
                                      names=["ids", "logprobs", "target"])
