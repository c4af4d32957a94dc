"""Loading the config: a YAML recipe (a file or a built-in name: ``quickstart``, ``imdb``,
``codealpaca``, ``alpaca``) plus ``key=value`` overrides with dotted keys, for example
``data.max_length=256 train.lr=1e-4``. Values are parsed as YAML scalars (``true``, ``3``,
``[a, b]``). An unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sftune.config.roles import Role
from sftune.config.schema import Config
from sftune.errors import ConfigError


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


# ----------------------------------------------------------------------------- key helpers


def section_models() -> dict[str, type[BaseModel]]:
    return {
        name: field.annotation
        for name, field in Config.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def keys_with(role: Role) -> list[str]:
    """The dotted keys (``data.num_proc``) whose field, or whose whole section, declares ``role``
    (:mod:`sftune.config.roles`)."""
    return [f"{section}.{name}" for section, model in section_models().items()
            for name, field in model.model_fields.items() if role in getattr(model, "section_roles", ()) or role in field.metadata]


def valid_keys() -> list[str]:
    """All dotted keys of the schema, e.g. ``data.max_length``."""
    keys = [k for k, f in Config.model_fields.items() if k not in section_models()]
    for section, model in section_models().items():
        keys += [f"{section}.{k}" for k in model.model_fields]
    return keys


def describe_keys() -> list[tuple[str, str, str]]:
    """``(key, default, description)`` for every config key (used by docs and ``--help``)."""
    rows = []
    for section, model in section_models().items():
        for name, field in model.model_fields.items():
            default = field.default
            rows.append((f"{section}.{name}", repr(default), (field.description or "").replace("\n", " ")))
    return rows


# Names users bring from transformers / TRL / Axolotl, mapped to sftune's keys.
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler", "max_seq_length": "data.max_length", "sequence_len": "data.max_length",
    "max_seq_len": "data.max_length", "dataset_text_field": "data.text_column", "logging_steps": "train.log_every",
    "save_steps": "train.save_every", "eval_steps": "train.eval_every", "save_total_limit": "train.keep_checkpoints",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "model_name_or_path": "model.path", "base_model": "model.path",
    "dataset_name": "data.path", "dataset": "data.path", "completion_only_loss": "data.train_on_prompt",
    "resume_from_checkpoint": "train.resume", "torch_dtype": "model.dtype", "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision", "warmup": "train.warmup_ratio",
    # short names people type on the command line
    "lr": "train.lr", "epochs": "train.epochs", "steps": "train.max_steps", "bs": "train.batch_size",
    "batch": "train.batch_size", "accum": "train.grad_accum", "max_len": "data.max_length",
    "seq_len": "data.max_length", "model": "model.path", "data": "data.path", "output": "train.output_dir",
    "out": "train.output_dir", "output_dir": "train.output_dir", "seed": "train.seed",
}

_MISSING = object()


def _kind_fits(key: str, value: Any) -> bool:
    """Whether ``value`` could be a value of ``key`` (by the field's default), so ``lr=1e-4`` is not
    matched to an integer key such as ``lora.r``."""
    if value is _MISSING or value is None:
        return True
    section, _, name = key.partition(".")
    model = section_models().get(section)
    field = model.model_fields.get(name) if model else None
    if field is None:
        return True
    default = field.default
    if isinstance(value, str):
        try:
            value = float(value)  # "1e-4": YAML reads it as a string, the schema as a number
        except ValueError:
            pass
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) == isinstance(default, bool) or default is None
    if isinstance(value, float):
        return isinstance(default, float) or default is None
    if isinstance(value, int):
        return isinstance(default, (int, float)) or default is None
    return not isinstance(default, (int, float)) or default is None


def _closest(key: str, value: Any = _MISSING) -> str:
    """The valid key a mistyped one most likely meant: an alias, the same leaf name in another
    section, else the closest spelling whose kind of value fits ``value``."""
    options = valid_keys()
    leaf = key.split(".")[-1]
    if re.match(r"^data\.sources\.\d+\.", key):  # a key inside a data.sources entry
        from sftune.config.schema import SourceConfig

        match = difflib.get_close_matches(leaf, list(SourceConfig.model_fields), n=1, cutoff=0.5)
        if match:
            return f" Did you mean '{match[0]}' (data.{match[0]} for that source)?"
        return f" A data.sources entry takes: {', '.join(SourceConfig.model_fields)}."
    if leaf in ALIASES:
        return f" Did you mean '{ALIASES[leaf]}'?"
    same_leaf = [k for k in options if k.split(".")[-1] == leaf and k != key]
    if same_leaf:
        return f" Did you mean '{same_leaf[0]}'?"
    leaves: dict[str, list[str]] = {}
    for k in options:
        leaves.setdefault(k.split(".")[-1], []).append(k)
    candidates = difflib.get_close_matches(key, options, n=5, cutoff=0.5)
    for m in difflib.get_close_matches(leaf, list(leaves), n=5, cutoff=0.5):
        candidates += [k for k in leaves[m] if k not in candidates]
    fitting = [k for k in candidates if _kind_fits(k, value)]
    return f" Did you mean '{fitting[0]}'?" if fitting else ""


def _unknown_key_error(key: str, source: str, value: Any = _MISSING) -> ConfigError:
    where = "on the command line" if source == "the command line" else f"in {source}"
    return ConfigError(f"unknown config key '{key}' {where}.{_closest(key, value)} "
                       f"Run 'sftune config --keys' to list every key.")


def _check_keys(raw: dict, source: str) -> None:
    sections = section_models()
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {source} must be a mapping of keys, got {value!r}.")
            for sub in value:
                if sub not in sections[key].model_fields:
                    raise _unknown_key_error(f"{key}.{sub}", source, value[sub])
        elif key not in Config.model_fields:
            raise _unknown_key_error(key, source, value)


def parse_override(item: str) -> tuple[str, Any]:
    """``'data.max_length=256'`` -> ``('data.max_length', 256)``; values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (for example data.max_length=256).")
    key, _, text = item.partition("=")
    return key.strip(), parse_value(text)


def parse_value(text: str) -> Any:
    """Parse a command-line value: numbers, ``true``/``false``, ``null``, ``[a, b]`` lists and
    quoted strings as YAML; anything else (templates such as ``### Answer: {output}``) verbatim."""
    s = text.strip()
    if s in ("null", "None", "none", "~"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if s.startswith(("'", '"', "[")):
        try:
            return yaml.safe_load(s)
        except yaml.YAMLError:
            return text
    try:
        value = yaml.safe_load(s)
    except yaml.YAMLError:
        return text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set the dotted ``key`` (``data.max_length``) of ``raw``, a config as a dict, to ``value``:
    the one way an override is applied (the command line, the dashboard)."""
    parts = key.split(".")
    if len(parts) > 2:
        raise _unknown_key_error(key, "the command line")
    if len(parts) == 1:
        raw[key] = value
        return
    section, name = parts
    if section not in section_models():
        raise _unknown_key_error(key, "the command line")
    node = raw.setdefault(section, {}) or {}
    raw[section] = node
    node[name] = value


def resolve_recipe(recipe: str | Path) -> tuple[Path, str]:
    """Return the YAML path and the recipe name for a path or a built-in name."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"recipe file '{p}' does not exist.")
        return p, p.stem
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.exists():
        return builtin, str(recipe)
    names = builtin_recipes()
    match = difflib.get_close_matches(str(recipe), names, n=1)
    hint = f" Did you mean '{match[0]}'?" if match else ""
    raise ConfigError(f"'{recipe}' is neither a YAML file nor a built-in recipe ({', '.join(names)}).{hint}")


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (naming both lines)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the default constructor report it
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key '{key}' appears twice: on line {first + 1} and on line "
                f"{key_node.start_mark.line + 1}; keep one of them", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: Path):
    """Parse a YAML recipe; duplicate keys and syntax errors are a :class:`ConfigError`."""
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"{path}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the recipe {path}: {e}") from None


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a recipe (a YAML path or built-in name) and apply overrides.

    ``overrides`` is a list of ``key=value`` strings or a dict of dotted keys to values.
    """
    raw: dict = {}
    source = "the config"
    name = None
    if recipe is not None:
        path, name = resolve_recipe(recipe)
        source = str(path)
        raw = load_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections (model, data, train, ...).")
        _check_keys(raw, source)
    items = apply_overrides(raw, overrides)
    if name and not raw.get("recipe"):
        raw["recipe"] = name
    return validate_config(raw, source, overridden={k for k, _ in items})


def apply_overrides(raw: dict, overrides: list[str] | dict | None) -> list[tuple[str, Any]]:
    """Apply ``overrides`` (``key=value`` strings or a dict of dotted keys to values) to ``raw`` in
    place, refusing unknown keys with the closest valid one; returns the ``(key, value)`` pairs."""
    items = list(overrides.items()) if isinstance(overrides, dict) else \
        [parse_override(o) for o in overrides or []]
    for key, value in items:
        set_dotted(raw, key, value)
    _check_keys(raw, "the command line")
    return items


def validate_config(raw: dict, source: str = "the config", overridden: set[str] | None = None) -> Config:
    """Validate ``raw``; an invalid value is blamed on the command line when an override set it
    (``overridden`` holds those dotted keys), else on ``source``."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines, sources = [], []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            from_cli = any(key == k or key.startswith(k + ".") for k in overridden or ())
            if err["type"] == "extra_forbidden":
                raise _unknown_key_error(key, "the command line" if from_cli else source) from None
            where = "the command line" if from_cli else source
            if where not in sources:
                sources.append(where)
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        where = " and ".join(("on " if w == "the command line" else "in ") + w for w in sources)
        raise ConfigError(f"invalid config {where}:\n" + "\n".join(lines)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
