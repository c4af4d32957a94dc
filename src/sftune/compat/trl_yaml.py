"""``sftune train --trl-config sft.yaml``: a ``trl sft`` CLI config run by the TRL 1.x front.

The YAML holds TRL's three argument groups flat, as ``trl sft --config`` reads them: the script's
(``dataset_name``, ``dataset_config``, ``dataset_train_split``, ``dataset_test_split``),
``ModelConfig``'s (``model_name_or_path``, ``model_revision``, ``dtype``, ``trust_remote_code``,
``attn_implementation``, and the LoRA fields ``use_peft``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``, ``lora_modules_to_save``, ``load_in_4bit``) and
:class:`~sftune.compat.trl1.SFTConfig`'s fields. An unknown key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import yaml

from sftune.errors import ConfigError

SCRIPT = {"dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_streaming",
          "ignore_bias_buffers"}
MODEL = {"model_name_or_path", "model_revision", "dtype", "torch_dtype", "trust_remote_code", "attn_implementation",
         "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
         "lora_task_type", "load_in_4bit", "load_in_8bit", "use_bnb_nested_quant", "bnb_4bit_quant_type"}


def _dataset(name: str, config: str | None, split: str):
    import datasets

    path = Path(name)
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise ConfigError(f"dataset_name={name!r}: a local file must be .json, .jsonl, .csv or .parquet")
        return datasets.load_dataset(kind, data_files={"train": str(path)}, split="train")
    dd = datasets.load_dataset(name, config)
    if split not in dd:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; it has {', '.join(dd)}")
    return dd


def load_trl_config(path: str | Path):
    """The trainer arguments of a ``trl sft`` YAML: ``(model, args, train_dataset, eval_dataset, peft_config)``."""
    from sftune.compat.trl1 import SFTConfig

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--trl-config {path}: no such file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a trl sft config is a mapping of keys to values")
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in raw:
        if key not in SCRIPT | MODEL | sft_fields:
            match = difflib.get_close_matches(key, sorted(SCRIPT | MODEL | sft_fields), n=1)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f"; did you mean {match[0]!r}?" if match else ""))
    if "model_name_or_path" not in raw or "dataset_name" not in raw:
        raise ConfigError(f"{path}: a trl sft config needs model_name_or_path and dataset_name")
    if raw.get("dataset_streaming"):
        raise ConfigError(f"{path}: dataset_streaming=true is not supported; sftune reads the whole dataset")
    for key in ("load_in_8bit", "use_bnb_nested_quant"):
        if raw.get(key):
            raise ConfigError(f"{path}: {key} is not supported; use load_in_4bit: true with use_peft: true (QLoRA)")
    kwargs = dict(raw.get("model_init_kwargs") or {})
    for key, name in (("model_revision", "revision"), ("dtype", "dtype"), ("torch_dtype", "dtype"),
                      ("attn_implementation", "attn_implementation")):
        if raw.get(key) is not None:
            kwargs[name] = raw[key]
    args = SFTConfig(**{k: v for k, v in raw.items() if k in sft_fields and k != "model_init_kwargs"},
                     model_init_kwargs=kwargs or None)
    if raw.get("trust_remote_code"):
        args.trust_remote_code = True
    data = _dataset(raw["dataset_name"], raw.get("dataset_config"), raw.get("dataset_train_split", "train"))
    if not hasattr(data, "keys"):  # a local file: one split
        train, test = data, None
    else:
        train = data[raw.get("dataset_train_split", "train")]
        test_split = raw.get("dataset_test_split", "test")
        test = data[test_split] if test_split in data and args.eval_strategy != "no" else None
    peft_config = None
    if raw.get("use_peft"):
        from peft import LoraConfig

        if raw.get("load_in_4bit"):
            raise ConfigError(f"{path}: load_in_4bit: give it as sftune's lora.load_in_4bit in a recipe; the TRL "
                              "front trains LoRA on the loaded weights")
        targets = raw.get("lora_target_modules")
        peft_config = LoraConfig(r=raw.get("lora_r", 16), lora_alpha=raw.get("lora_alpha", 32),
                                 lora_dropout=raw.get("lora_dropout", 0.05), target_modules=targets,
                                 modules_to_save=raw.get("lora_modules_to_save"), task_type="CAUSAL_LM")
    return raw["model_name_or_path"], args, train, test, peft_config


def run_trl_config(path: str | Path) -> int:
    """Train as the YAML says (the trainer prints the mapping); the exit status of ``sftune train``."""
    from sftune.cluster import exit_status
    from sftune.compat.trainer import SFTTrainer

    model, args, train, test, peft_config = load_trl_config(path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=bool(args.resume_from_checkpoint))
    return exit_status(trainer.result, resume_hint=f"add `resume_from_checkpoint: true` to {path} and run "
                                                   f"sftune train --trl-config {path} again")
