"""The data position in a checkpoint, and the refusal of a resume whose data changed.

Runs with ``data.sources`` or ``data.streaming`` save ``data_position.pkl`` in every checkpoint:
the *signature* of their data (sources, weights, paths, each source's data keys, the tokenizer,
``max_length``, the seed, and for streams the packing and buffer sizes) and, for a stream, its
whole position (:meth:`sftune.data.stream.StreamBatches.state_at`). A resume compares the
signature first and refuses, naming what changed; then a stream continues from its position. (An
in-memory mixture needs no position: its batches are a function of the step.)
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

from sftune.config.schema import SOURCE_KEYS
from sftune.data.mixture import SourceSpec
from sftune.data.one_source import tokenizer_signature
from sftune.errors import DataError

FILE = "data_position.pkl"


def signature(specs: list[SourceSpec], tokenizer, max_length: int, cfg, seed: int) -> dict:
    """What the data of a mixture or a stream depends on."""
    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]

    sig = {"sources": [s.label for s in specs], "weights": [round(s.weight, 6) for s in specs],
           "paths": [s.cfg.path for s in specs], "tokenizer": tokenizer_signature(tokenizer),
           "format": [digest(s.cfg.model_dump(include=set(SOURCE_KEYS))) for s in specs], "max_length": max_length,
           "seed": seed, "streaming": cfg.streaming, "packing": cfg.packing}
    if cfg.streaming:
        sig.update(pack_buffer=cfg.pack_buffer, shuffle_buffer=cfg.shuffle_buffer)
    return sig


def save_position(signature: dict | None, stream_state: bytes | None, step: int) -> dict[str, bytes]:
    """Files for the checkpoint of ``step`` (none for a single in-memory source); ``stream_state``
    is a stream's position (:meth:`~sftune.data.stream.StreamBatches.state_at`), None in memory."""
    if signature is None:
        return {}
    stream = pickle.loads(stream_state) if stream_state is not None else None
    return {FILE: pickle.dumps({"signature": signature, "step": step, "stream": stream})}


def restore_position(signature: dict | None, checkpoint: str | Path) -> dict | None:
    """Refuse a resume whose data changed; the stream's position saved in the checkpoint (None
    in memory)."""
    path = Path(checkpoint) / FILE
    if signature is None:
        if path.exists():
            raise DataError(f"the checkpoint {checkpoint} was saved by a run with data.sources or data.streaming, "
                            "and this run has neither: it would continue on other data",
                            hint="resume with the data settings the run was started with, or start a new run "
                            "(train.resume=false)")
        return None
    if not path.exists():
        raise DataError(f"the checkpoint {checkpoint} has no data position ({FILE}): it was saved by a run without "
                        "data.sources or data.streaming", hint="resume with the data settings the run was started "
                        "with, or start a new run (train.resume=false)")
    saved = pickle.loads(path.read_bytes())
    changed = [k for k in signature if saved["signature"].get(k) != signature[k]]
    if changed:
        what = "; ".join(f"{k}: {saved['signature'].get(k)} -> {signature[k]}" for k in changed)
        raise DataError(f"the data changed since the checkpoint ({what}); the resumed run would not continue the "
                        "same data", source=str(checkpoint), hint="resume with the data settings the run was "
                        "started with, or start a new run (train.resume=false)")
    return saved["stream"]
