"""Start a run from a form: the form is generated from the config schema, validated by
:func:`sftune.config.load_config` (so the errors are the CLI's), and trained by ``sftune train`` in a
child process writing under RUNS_DIR."""

from __future__ import annotations

import subprocess
import sys
import types
import typing
from pathlib import Path

from sftune.errors import ConfigError

_children: list[subprocess.Popen] = []  # reaped as new runs start


def _kind(annotation) -> tuple[str, list | None, bool]:
    """``(kind, choices, nullable)`` for a field: bool, int, float, choice, text or json."""
    args = typing.get_args(annotation)
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        nullable = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            annotation, args = rest[0], typing.get_args(rest[0])
        else:
            return "json", None, nullable
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", list(args), nullable
    for t, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "text")):
        if annotation is t:
            return name, None, nullable
    return "json", None, nullable


def schema(recipe: str) -> list[dict]:
    """Every key of the config with its recipe value, default, kind and description."""
    from sftune.config import Config, load_config
    from sftune.config.loading import section_models

    values = load_config(recipe).model_dump(mode="json")
    fields = []
    for section, model in section_models().items():
        for name, field in model.model_fields.items():
            kind, choices, nullable = _kind(field.annotation)
            fields.append({"key": f"{section}.{name}", "section": section, "kind": kind, "choices": choices,
                           "nullable": nullable, "value": values[section][name],
                           "default": getattr(Config(), section).model_dump(mode="json")[name],
                           "description": (field.description or "").strip()})
    return fields


def start(root: Path, recipe: str, overrides: dict, name: str) -> dict:
    """Validate and start ``sftune train`` for ``recipe`` with ``overrides`` into ``root/name``."""
    from sftune.config import config_to_yaml, load_config
    import sftune.dashboard.runs as R

    for p in [p for p in _children if p.poll() is not None]:
        _children.remove(p)
    if not name or name.startswith(".") or any(part in ("", "..") for part in name.split("/")):
        raise ConfigError(f"run name '{name}': give a folder name under the runs directory, e.g. quickstart-2")
    try:
        out = R.inside(root, name)
    except R.NotARun:
        raise ConfigError(f"run name '{name}' leaves the runs directory") from None
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{name} already exists under the runs directory: pick another name")
    overrides = {**{k: v for k, v in overrides.items() if k != "train.output_dir"}, "train.output_dir": str(out)}
    cfg = load_config(recipe, overrides)  # the CLI's validation and messages
    out.mkdir(parents=True)
    (out / "sftune_config.yaml").write_text(config_to_yaml(cfg))  # listed at once; train rewrites it
    log = (out / "train.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sftune", "train", str(out / "sftune_config.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(root),
                            start_new_session=True)
    _children.append(proc)
    return {"name": name, "pid": proc.pid}
