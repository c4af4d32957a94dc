"""What an export came from: ``sftune_lineage.json`` (base model, prompt format identity and hash,
stop tokens, data fingerprint, sftune version), so preference training starts from the same prompt
contract and ``--verify`` can check it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


from sftune import __version__
from sftune.config import Config
from sftune.data.formats import Format



LINEAGE = "sftune_lineage.json"
Q8_0_TOLERANCE = 0.05
"""Largest |logit difference| accepted between a q8_0 GGUF and the exported weights, relative to
max(1, largest |logit|). f16/bf16 files are compared with the weights rounded to that dtype."""


def format_hash(fmt: Format, tokenizer) -> str:
    """A hash of what defines the prompt contract: the format identity, its chat template, the BOS
    rule and the stop tokens."""
    payload = json.dumps({"identity": fmt.identity(), "name": fmt.name, "add_bos": fmt.add_bos,
                          "chat_template": fmt.export_chat_template(tokenizer),
                          "stops": [tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids(tokenizer)]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def data_fingerprint(cfg: Config | None) -> dict | None:
    """sha256 over the training data files (local data), or the hub id (no revision is recorded)."""
    if cfg is None:
        return None
    p = Path(cfg.data.path)
    info = {"path": cfg.data.path, "split": cfg.data.split, "limit": cfg.data.limit}
    if not p.exists():
        return {**info, "sha256": None, "note": "not a local path at export time (a hub dataset?)"}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {**info, "sha256": h.hexdigest(), "files": len(files)}


def lineage(source: str, cfg: Config | None, fmt: Format, tokenizer, **extra) -> dict:
    """What an export came from: base model, prompt format (identity and hash), stops, data, version."""
    base = cfg.model.path if cfg is not None else None
    adapter = Path(source) / "adapter_config.json"
    if adapter.exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path", base)
    stops = fmt.stop_ids(tokenizer)
    return {"sftune_version": __version__, "source": str(source), "base_model": base,
            "lora": bool(cfg is not None and cfg.lora.enabled),
            "format": {"name": fmt.name, "identity": fmt.identity(), "hash": format_hash(fmt, tokenizer),
                       "add_bos": fmt.add_bos, "chat_template": bool(fmt.export_chat_template(tokenizer))},
            "stop_ids": stops, "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in stops],
            "data": data_fingerprint(cfg), **extra}


def write_lineage(out_dir: Path, info: dict) -> Path:
    path = Path(out_dir) / LINEAGE
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return path
