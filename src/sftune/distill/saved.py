"""The saved path: the teacher runs once (``sftune distill-prepare``); training reads its top-k.

:func:`prepare_saved` tokenizes the data exactly as training will, runs the teacher over the kept
training examples and writes, for every trained position (each loss position, in order), the
teacher's ``k`` most likely token ids and their log-probabilities at temperature 1 (sorted, most
likely first), plus the log-probability of the data's token (the teacher's own cross-entropy, for
the logs). Shards of ``distill.prepare_shard_size`` examples are Arrow datasets
(``shards/shard-NNNNN``, written to a temporary name and renamed: a shard that exists is whole), so
a rerun skips the finished shards. ``manifest.json`` records the teacher, k and a fingerprint of the
tokenized data; training refuses saved rows made for other data.

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
import shutil
from pathlib import Path

import numpy as np
import torch

import sftune.data.extras as data_extras
from sftune.data.tokenize import IGNORE
from sftune.errors import ConfigError

KIND = "teacher"
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


def prepare_saved(cfg, out_dir: str, console=None) -> dict:
    """``sftune distill-prepare``: run ``distill.teacher`` over the run's training examples once and
    write their top-k rows to ``out_dir`` (resumable). Returns the manifest."""
    import datasets

    from sftune.data.chain import prepare
    from sftune.data.packing import collate
    from sftune.distill.teacher import load_teacher
    from sftune.model import load_model_config, load_tokenizer, resolve_max_length
    from sftune.probe import PADDED, probe_examples

    d = cfg.distill
    if not d.teacher:
        raise ConfigError("sftune distill-prepare needs distill.teacher=DIR (the teacher to run)")
    if cfg.data.sources or cfg.data.streaming:
        raise ConfigError("sftune distill-prepare reads one source: data.sources and data.streaming are not supported "
                          "for saved teacher rows yet (use the live teacher: distill.teacher without distill.saved)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, _ = load_tokenizer(cfg)
    max_length = resolve_max_length(cfg, tokenizer, load_model_config(cfg))
    data = prepare(cfg.data, tokenizer, max_length, seed=cfg.train.seed)
    teacher = load_teacher(d.teacher, tokenizer, len(tokenizer), device, d.teacher_dtype, PADDED,
                           probe_examples(data.train), cfg.model.check)  # checked as it runs here
    train = data.train
    per = PREPARE_BATCH if teacher.lm.fused else 1  # its own logits: [one example's positions, vocab] at a time
    out = Path(out_dir)
    manifest = {"version": VERSION, "teacher": teacher.path, "k": d.prepare_top_k, "examples": len(train),
                "shard_size": d.prepare_shard_size, "fingerprint": data_fingerprint(train),
                "vocab": len(tokenizer), "max_length": max_length}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if {k: old.get(k) for k in manifest} != manifest:
            diff = [k for k in manifest if old.get(k) != manifest[k]]
            raise ConfigError(f"{out} holds saved teacher rows made with other settings ({', '.join(diff)} differ): "
                              "give another --out, or delete it")
    out.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(manifest, indent=2))
    k = min(d.prepare_top_k, len(tokenizer))
    shards = _shards(out, len(train), d.prepare_shard_size)
    done = 0
    for s, path in enumerate(shards):
        if path.exists():
            done += 1
            continue
        rows = {"ids": [], "logprobs": [], "target": []}
        lo, hi = s * d.prepare_shard_size, min(len(train), (s + 1) * d.prepare_shard_size)
        for g in range(lo, hi, per):
            examples = [train.example(i) for i in range(g, min(hi, g + per))]
            batch = collate([[ex] for ex in examples], tokenizer.pad_token_id or 0)
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
            for ids, labels in examples:  # each example's loss positions, in order (as collate finds them)
                n = int((np.asarray(labels[1:]) != IGNORE).sum())
                for key in rows:
                    rows[key].append(got[key][start:start + n].tolist())
                start += n
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
    return manifest


def attach_saved(saved: str, data, tokenizer) -> tuple[int, dict]:
    """Add the saved rows in ``saved`` to ``data.train`` as the ``teacher`` kind; ``(k, description)``."""
    import datasets
    import pyarrow as pa

    out = Path(saved)
    mpath = out / "manifest.json"
    if not mpath.exists():
        raise ConfigError(f"distill.saved={saved} holds no saved top-k (no manifest.json): write it with "
                          "sftune distill-prepare RECIPE distill.teacher=DIR --out DIR")
    manifest = json.loads(mpath.read_text())
    train = data.train
    if not hasattr(train, "add_extra") or data.signature is not None:
        raise ConfigError("distill.saved reads one tokenized source: data.sources and data.streaming are not "
                          "supported with saved teacher rows yet (use the live teacher)")
    if manifest["vocab"] != len(tokenizer):
        raise ConfigError(f"distill.saved={saved} was prepared with a {manifest['vocab']}-token tokenizer; this run's "
                          f"has {len(tokenizer)}: prepare it with the student's tokenizer")
    if manifest["fingerprint"] != data_fingerprint(train) or manifest["examples"] != len(train):
        raise ConfigError(f"distill.saved={saved} was prepared for other data (the tokenized examples differ: data, "
                          "tokenizer, format or max_length changed): rerun sftune distill-prepare with this config")
    shards = _shards(out, manifest["examples"], manifest["shard_size"])
    missing = [p.name for p in shards if not p.exists()]
    if missing:
        raise ConfigError(f"distill.saved={saved} is incomplete ({len(missing)} of {len(shards)} shards missing, "
                          f"e.g. {missing[0]}): rerun sftune distill-prepare with the same --out to finish it")
    table = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in shards]).with_format("arrow")[:]
    column = pa.StructArray.from_arrays([table.column(c).combine_chunks() for c in ("ids", "logprobs", "target")],
                                        names=["ids", "logprobs", "target"])
    train.add_extra(KIND, column, by_example=True)
    k = manifest["k"]
    return k, {"teacher": manifest["teacher"], "how": "saved", "saved": str(out), "saved_k": k}
