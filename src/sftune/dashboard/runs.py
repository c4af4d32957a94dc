"""Runs on disk: find them under RUNS_DIR, read their files, tell their state.

A run is a directory that ``sftune train`` wrote: ``metrics.jsonl``, ``sftune_config.yaml``,
``data_report.json``, ``final_metrics.json``, ``checkpoints/step-N/`` and the final model. Nothing
here writes; names are paths relative to RUNS_DIR and never leave it.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import yaml

from sftune.checkpoint import list_checkpoints
from sftune.runlock import pid_alive

# A running trainer holds ``.sftune.lock`` ({"pid", "host", "started"}) in its output directory; the
# other names are read too. Without a lock, a run is "running" while its files keep changing.
LOCK_NAMES = (".sftune.lock", "sftune.lock", "run.lock", "train.lock")
RECENT_S = 120.0
RUN_FILES = ("metrics.jsonl", "sftune_config.yaml")


class NotARun(LookupError):
    """The name is not a run under RUNS_DIR (missing, or outside it)."""


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, refusing anything outside ``root`` (``..``, absolute paths, links)."""
    root = root.resolve()
    if not relative or "\x00" in relative:
        raise NotARun(relative)
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise NotARun(relative)
    return path


def is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in RUN_FILES)


def find_runs(root: Path, depth: int = 3) -> list[str]:
    """Names (paths relative to ``root``, ``.`` for root itself) of the runs under ``root``."""
    root = root.resolve()
    found = []

    def walk(d: Path, level: int) -> None:
        if is_run(d):
            found.append(d.relative_to(root).as_posix() if d != root else ".")
            return  # a run's own subdirectories (checkpoints, plots) are not runs
        if level >= depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, level + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def run_dir(root: Path, name: str) -> Path:
    path = inside(root, name)
    if not path.is_dir() or not is_run(path):
        raise NotARun(name)
    return path


_parsed: dict[str, tuple[tuple[int, int], list[dict]]] = {}  # path -> ((size, mtime), records): the runs list polls


def read_metrics(run: Path, since: int = 0) -> list[dict]:
    """``metrics.jsonl`` records from line ``since`` on; a line still being written is left for later."""
    path = run / "metrics.jsonl"
    try:
        st = path.stat()
    except OSError:
        return []
    if since == 0:
        key = (st.st_size, st.st_mtime_ns)
        cached = _parsed.get(str(path))
        if cached is None or cached[0] != key:
            cached = _parsed[str(path)] = (key, _read_lines(path, 0))
        return list(cached[1])
    return _read_lines(path, since)


def _read_lines(path: Path, since: int) -> list[dict]:
    records = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i < since:
                continue
            if not line.endswith("\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({})  # keep line numbers aligned with ``since``
    return records


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_config(run: Path) -> dict:
    try:
        return yaml.safe_load((run / "sftune_config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def has_final_model(run: Path) -> bool:
    return (run / "config.json").is_file() or (run / "adapter_config.json").is_file()


def _lock_owner(run: Path) -> tuple[int, str | None] | None:
    """``(pid, host)`` of the lock file's owner (host None when the lock holds a bare PID)."""
    for name in LOCK_NAMES:
        try:
            text = (run / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text), None
        try:
            owner = json.loads(text)
            return int(owner["pid"]), owner.get("host")
        except (ValueError, KeyError, TypeError):
            continue
    return None


def state(run: Path, now: float | None = None) -> str:
    """``finished`` (final metrics written), ``running`` (the lock's process is alive, or without a lock,
    files changed in the last two minutes), ``interrupted`` (a checkpoint to resume from), else ``failed``."""
    if (run / "final_metrics.json").exists():
        return "finished"
    owner = _lock_owner(run)
    if owner is not None:
        pid, host = owner
        if (host not in (None, socket.gethostname())) or pid_alive(pid):  # another host's PID cannot be checked
            return "running"
    else:
        now = time.time() if now is None else now
        mtimes = [(run / f).stat().st_mtime for f in RUN_FILES if (run / f).exists()]
        if mtimes and now - max(mtimes) < RECENT_S:
            return "running"
    return "interrupted" if list_checkpoints(run) else "failed"


def summary(root: Path, name: str) -> dict:
    run = run_dir(root, name)
    records = read_metrics(run)
    cfg = read_config(run)
    train = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_loss" in r]
    final = read_json(run / "final_metrics.json") or {}
    steps = max((r.get("step", 0) for r in records), default=0)
    start = records[0].get("time") if records else None
    if start is None and (run / "sftune_config.yaml").exists():
        start = (run / "sftune_config.yaml").stat().st_mtime
    t = cfg.get("train") or {}
    return {
        "name": name,
        "state": state(run),
        "recipe": cfg.get("recipe"),
        "model": (cfg.get("model") or {}).get("path"),
        "step": steps,
        "max_steps": t.get("max_steps"),
        "loss": train[-1]["loss"] if train else final.get("train_loss"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
        "checkpoint_age_s": train[-1].get("checkpoint_age_s") if train else None,  # at the last log line
        "start_time": start,
        "chat": has_final_model(run),
    }


def total_steps(records: list[dict], cfg: dict) -> int:
    """The optimizer steps the run is set to take (the compare charts' "fraction of the run"):
    ``train.max_steps``, else ``train.epochs`` times the steps per epoch its records show, else the
    last logged step."""
    t = cfg.get("train") or {}
    train = [r for r in records if "loss" in r and isinstance(r.get("step"), int)]
    last = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
    if isinstance(t.get("max_steps"), int) and t["max_steps"] > 0:
        return t["max_steps"]
    epochs = t.get("epochs")
    if train and isinstance(epochs, (int, float)) and epochs > 0 and train[-1].get("epoch"):
        return max(last, round(train[-1]["step"] / train[-1]["epoch"] * epochs))
    return max(last, 1)


def details(root: Path, name: str) -> dict:
    run = run_dir(root, name)
    config_text = (run / "sftune_config.yaml").read_text() if (run / "sftune_config.yaml").exists() else ""
    checkpoints = []
    for ck in list_checkpoints(run):
        st = read_json(ck / "trainer_state.json") or {}
        checkpoints.append({"name": ck.name, "step": st.get("step"), "path": ck.relative_to(run).as_posix()})
    return {
        **summary(root, name),
        "data_report": read_json(run / "data_report.json"),
        "final_metrics": read_json(run / "final_metrics.json"),
        "config": read_config(run),
        "config_yaml": config_text,
        "checkpoints": checkpoints,
        "files": sorted(p.name for p in run.iterdir() if p.is_file()),
    }


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(configs: dict[str, dict]) -> list[dict]:
    """Keys whose values differ between runs: ``[{"key", "values": {run: value}}]``."""
    flat = {name: flatten(c) for name, c in configs.items()}
    keys = sorted(set().union(*[f.keys() for f in flat.values()])) if flat else []
    diff = []
    for key in keys:
        values = {name: f.get(key) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            diff.append({"key": key, "values": values})
    return diff
