"""The TRL 0.7 front: ``SFTTrainer``'s 0.7 arguments and ``DataCollatorForCompletionOnlyLM``.

Notebooks written for the old ``trl`` API run with one changed import::

    from sftune import SFTTrainer, DataCollatorForCompletionOnlyLM   # was: from trl import ...

This module is a translation layer, not a second engine. :func:`build` turns 0.7-style arguments
(and the fields of ``transformers.TrainingArguments``) into an :class:`~sftune.config.Config`, and
wraps the datasets into a :class:`~sftune.data.sources.Source`; the one ``SFTTrainer``
(:mod:`sftune.compat.trainer`) prints which config key each legacy argument became, so a run can
move to a recipe, and its ``.train()`` calls :func:`sftune.training.train` once. The argument
mapping here (:class:`Guidance`, :func:`map_training_args`, :func:`map_peft`) is shared with the
TRL 1.x front (:mod:`sftune.compat.trl1`).

``DataCollatorForCompletionOnlyLM`` keeps its meaning (loss only after the response template) but
is never run as a collator: it becomes ``data.response_template``, a text format that splits every
text after the *last* occurrence of the template as a string (as TRL 0.7 kept the last match; rows
where it occurs more than once are counted and named), and labels come from the whole text
tokenized once (``sftune.data.tokenize``). No token ids are matched, so "could not find response
key" cannot happen; a text without the template is a counted skip with a warning.

Multi-turn data: with ``instruction_template``, every span after a response template up to the next
instruction template is trained, as TRL did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import difflib
import math
import shlex
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from peft import LoraConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
from rich.markup import escape
from rich.table import Table
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from sftune.config import Config, load_config

# the completion-only split and TRL's formatting_func are data formats; re-exported for the old import paths
from sftune.data.formats import (  # noqa: F401
    EMPTY,
    NOT_FOUND,
    Format,
    FunctionFormat,
    named_equivalent,
    split_at_response,
)
from sftune.data.sources import Source, with_row_index
from sftune.errors import ConfigError, SftuneError
from sftune.model import add_lora, load_model, load_tokenizer, ready_tokenizer
from sftune.console import console

# ----------------------------------------------------------------------------- completion-only loss


class DataCollatorForCompletionOnlyLM:
    """Loss only on the text after ``response_template`` (TRL's collator, by name and meaning).

    ``response_template`` is a string, or token ids (decoded with ``tokenizer``), as TRL accepted.
    It is handed to :class:`SFTTrainer`, which splits each text at the template on the string level;
    sftune builds its own batches, so this object is never called on a batch, and
    ``pad_to_multiple_of`` / ``return_tensors`` are accepted for compatibility only.
    """

    def __init__(self, response_template: str | list[int], instruction_template: str | list[int] | None = None,
                 *, tokenizer=None, mlm: bool = False, ignore_index: int = -100, pad_to_multiple_of: int | None = None,
                 return_tensors: str = "pt"):
        if mlm:
            raise ConfigError("DataCollatorForCompletionOnlyLM(mlm=True) is masked language modelling; "
                              "fine-tuning a causal LM uses mlm=False")
        if ignore_index != -100:
            raise ConfigError(f"ignore_index={ignore_index}: sftune labels untrained tokens with -100 only")
        self.tokenizer = tokenizer
        self.response_template = self._as_text(response_template, "response_template")
        self.instruction_template = (None if instruction_template is None
                                     else self._as_text(instruction_template, "instruction_template"))

    def _as_text(self, value: str | list[int], name: str) -> str:
        if isinstance(value, str):
            text = value
        elif isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
            if self.tokenizer is None:
                raise ConfigError(f"{name} is given as token ids; pass tokenizer=... so they can be decoded to text")
            text = self.tokenizer.decode(list(value))
        else:
            raise ConfigError(f"{name} must be a string (or a list of token ids), got {type(value).__name__}")
        if not text:
            raise ConfigError(f"{name} is empty")
        return text

    def __call__(self, features):
        raise SftuneError("DataCollatorForCompletionOnlyLM is not a batch collator in sftune: pass it to "
                          "sftune.SFTTrainer(data_collator=...), which puts the loss after the response template")

    def __repr__(self) -> str:
        extra = f", instruction_template={self.instruction_template!r}" if self.instruction_template else ""
        return f"DataCollatorForCompletionOnlyLM({self.response_template!r}{extra})"


# ----------------------------------------------------------------------------- argument mapping

# SFTTrainer arguments that sftune accepts and has no use for (packing is exact, not by estimate).
IGNORED = {"dataset_batch_size", "infinite", "num_of_sequences", "chars_per_token"}
UNSUPPORTED = {
    "model_init": "pass the model, or its name, as model=",
    "compute_metrics": "sftune reports eval loss and perplexity; 'sftune eval RUN --data FILE' adds generation metrics",
    "preprocess_logits_for_metrics": "sftune never materialises logits; 'sftune eval' computes generation metrics",
    "callbacks": "sftune's loop has no callbacks; metrics go to OUTPUT_DIR/metrics.jsonl "
                 "(and TensorBoard or W&B with report_to)",
    "optimizers": "sftune uses AdamW with args.learning_rate, weight_decay, adam_beta1/2 and lr_scheduler_type",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented in sftune",
    "dataset_kwargs": "sftune tokenizes the data itself (BOS and EOS by construction)",
}
SUPPORTED = ["model", "args", "data_collator", "train_dataset", "eval_dataset", "tokenizer", "processing_class",
             "peft_config", "dataset_text_field", "formatting_func", "max_seq_length", "packing", "dataset_num_proc",
             "model_init_kwargs"]
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
# TrainingArguments fields read below; any other field the user changed is listed as ignored.
READ_FIELDS = {"output_dir", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
               "gradient_accumulation_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
               "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_grad_norm", "seed", "logging_steps",
               "save_strategy", "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "bf16", "fp16",
               "report_to", "gradient_checkpointing", "torch_compile"}
RUN_FILES = {"metrics.jsonl", "data_report.json", "final_metrics.json", "report.md"}  # with *.png: not model files


def _value(v: Any) -> Any:
    return getattr(v, "value", v)  # transformers' str enums (IntervalStrategy.STEPS) -> "steps"


def _cli(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


class Guidance:
    """Rows of the legacy-argument table and the overrides they become."""

    def __init__(self, api: str = "TRL 0.7"):
        self.api = api
        self.overrides: dict[str, Any] = {}
        self.rows: list[tuple[str, str]] = []
        self.not_expressible: list[str] = []

    def add(self, legacy: str, keys: dict[str, Any] | None = None, note: str = "", shown: bool = True) -> None:
        self.overrides.update(keys or {})
        if shown:
            text = " ".join(f"{k}={_cli(v)}" for k, v in (keys or {}).items())
            self.rows.append((legacy, (text + ("  " if text and note else "") + note) or "-"))

    def print(self, output_dir: str) -> None:
        t = Table(title=f"SFTTrainer ({self.api} API) → sftune config: each legacy argument and its key",
                  title_justify="left")
        t.add_column("legacy argument", style="bold", overflow="fold", ratio=1)
        t.add_column("sftune config", overflow="fold", ratio=1)
        for legacy, keys in self.rows:
            t.add_row(escape(legacy), escape(keys))
        console.print(t)
        if self.not_expressible:
            console.print("As a recipe: not fully expressible, since " + "; ".join(self.not_expressible) + ".",
                          markup=False)
        else:
            recipe = shlex.quote(str(Path(output_dir) / "sftune_config.yaml"))
            extra = " data.eval_split=YOUR_EVAL_SPLIT" if "data.eval_split" in self.overrides else ""
            console.print(f"As a recipe: training writes the full config to {escape(recipe)}; "
                          f"[bold]sftune train {escape(recipe)} data.path=YOUR_DATA_FILE{extra}[/] repeats this run.")


def _steps(value: float, total: int) -> int:
    """transformers' steps-or-ratio fields: an int, or a float in (0, 1) as a fraction of all steps."""
    return int(value) if value >= 1 else max(1, math.ceil(value * total))


def map_training_args(args: TrainingArguments, n_rows: int, g: Guidance, ref: TrainingArguments | None = None,
                      handled: frozenset[str] = frozenset()) -> None:
    """Read the relevant fields of ``args``; the ones the user changed (from ``ref``, by default
    ``TrainingArguments``' defaults) are shown in the table. ``handled``: fields the caller maps."""
    ref = ref if ref is not None else TrainingArguments(output_dir=args.output_dir)
    changed = {f.name for f in dataclasses.fields(args) if getattr(args, f.name, None) != getattr(ref, f.name, None)}
    bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
    max_steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    total = max_steps or max(1, math.ceil(math.ceil(n_rows / (bs * ga)) * args.num_train_epochs))

    def put(names: str, keys: dict[str, Any], note: str = "") -> None:
        """Map the fields ``names`` (space-separated); shown when the user changed one of them."""
        fields = names.split()
        shown = fields == ["output_dir"] or any(f in changed for f in fields)
        g.add(", ".join(f"args.{f}={_value(getattr(args, f, None))!r}" for f in fields), keys, note, shown)

    put("output_dir", {"train.output_dir": str(args.output_dir)})
    put("num_train_epochs", {"train.epochs": float(args.num_train_epochs)})
    put("max_steps", {"train.max_steps": max_steps})
    put("learning_rate", {"train.lr": float(args.learning_rate)})
    put("per_device_train_batch_size", {"train.batch_size": bs})
    put("gradient_accumulation_steps", {"train.grad_accum": ga})
    put("weight_decay", {"train.weight_decay": float(args.weight_decay)})
    put("adam_beta1 adam_beta2", {"train.adam_betas": [args.adam_beta1, args.adam_beta2]})
    put("adam_epsilon", {"train.adam_eps": float(args.adam_epsilon)})
    scheduler = str(_value(args.lr_scheduler_type))
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler_type={scheduler!r} is not supported; sftune has "
                          f"{', '.join(sorted(set(SCHEDULERS)))}")
    put("lr_scheduler_type", {"train.scheduler": SCHEDULERS[scheduler]})
    warmup = args.warmup_steps or 0
    if 0 < warmup < 1:
        put("warmup_steps", {"train.warmup_ratio": float(warmup), "train.warmup_steps": 0})
    else:
        put("warmup_steps", {"train.warmup_steps": int(warmup)})
    if getattr(args, "warmup_ratio", 0):  # transformers < 5
        put("warmup_ratio", {"train.warmup_ratio": float(args.warmup_ratio)})
    put("max_grad_norm", {"train.max_grad_norm": float(args.max_grad_norm) if args.max_grad_norm else None})
    put("seed", {"train.seed": int(args.seed)})
    put("logging_steps", {"train.log_every": _steps(args.logging_steps, total)})
    if _value(args.save_strategy) == "steps":
        put("save_strategy save_steps", {"train.save_every": _steps(args.save_steps, total)})
    else:
        note = "" if _value(args.save_strategy) == "no" else "(per-epoch saving: set train.save_every in steps)"
        put("save_strategy", {"train.save_every": None}, note)
    if args.save_total_limit:
        put("save_total_limit", {"train.keep_checkpoints": int(args.save_total_limit)})
    strategy = _value(args.eval_strategy)
    if strategy == "steps":
        put("eval_strategy eval_steps", {"train.eval_every": _steps(args.eval_steps or args.logging_steps, total)})
    elif strategy != "no":
        put("eval_strategy", {}, "evaluates at the end; set train.eval_every (steps) for more")
    gpu = torch.cuda.is_available()
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    put("bf16 fp16", {"train.mixed_precision": precision if gpu else "no"}, "" if gpu else "(no autocast on CPU)")
    report = [r for r in (args.report_to or []) if r in ("tensorboard", "wandb")]
    dropped = [r for r in (args.report_to or []) if r not in report]
    put("report_to", {"train.report_to": report}, f"({', '.join(dropped)}: not supported)" if dropped else "")
    if args.gradient_checkpointing:
        put("gradient_checkpointing", {"model.gradient_checkpointing": True})
    if args.torch_compile:
        put("torch_compile", {"train.compile": True})
    ignored = sorted(changed - READ_FIELDS - handled - {"do_train", "do_eval", "do_predict"})  # flags Trainer ignores too
    if ignored:
        g.add(", ".join(f"args.{n}" for n in ignored), None, "ignored (no sftune equivalent)")


def map_peft(peft_config, model) -> dict[str, Any]:
    """A ``peft.LoraConfig`` -> ``lora.*`` keys (``target_modules=None`` resolved as peft would)."""
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config={type(peft_config).__name__}: sftune trains LoRA adapters (peft.LoraConfig)")
    if peft_config.bias != "none":
        raise ConfigError(f"LoraConfig(bias={peft_config.bias!r}) is not supported; use bias='none'")
    for flag in ("use_dora", "use_rslora"):
        if getattr(peft_config, flag, False):
            raise ConfigError(f"LoraConfig({flag}=True) is not supported by sftune")
    targets = peft_config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in defaults:
            raise ConfigError(f"LoraConfig(target_modules=None): peft has no default modules for the model type "
                              f"{model_type!r}; set target_modules")
        targets = list(defaults[model_type])
    elif not isinstance(targets, str):
        targets = sorted(targets)
    saved = peft_config.modules_to_save
    return {"lora.enabled": True, "lora.r": peft_config.r, "lora.alpha": peft_config.lora_alpha,
            "lora.dropout": peft_config.lora_dropout, "lora.target_modules": targets,
            "lora.modules_to_save": sorted(saved) if saved else None}


def map_model_kwargs(kwargs: dict) -> dict[str, Any]:
    keys = {}
    for k, v in kwargs.items():
        if k in ("torch_dtype", "dtype"):
            keys["model.dtype"] = str(v).removeprefix("torch.")
        elif k in ("trust_remote_code", "revision", "attn_implementation"):
            keys[f"model.{k}"] = v
        else:
            raise ConfigError(f"model_init_kwargs[{k!r}] is not supported; sftune reads torch_dtype, "
                              "trust_remote_code, revision and attn_implementation")
    return keys


def as_dataset(value: Any, name: str) -> datasets.Dataset:
    if isinstance(value, datasets.Dataset):
        return value
    if isinstance(value, datasets.DatasetDict):
        raise ConfigError(f"{name} is a DatasetDict with the splits {list(value)}; pass one split, "
                          f"such as {name}=dataset['train']")
    if isinstance(value, datasets.IterableDataset):
        raise ConfigError(f"{name} is a streaming IterableDataset; load it without streaming=True")
    raise ConfigError(f"{name} must be a datasets.Dataset, got {type(value).__name__}")


def _check_extra(kwargs: dict, g: Guidance) -> None:
    """TRL arguments beyond sftune's: harmless ones are noted, others fail with the reason."""
    for k, v in kwargs.items():
        if k in IGNORED:
            g.add(f"{k}={v!r}", None, "ignored: sftune packs best-fit over the whole dataset")
        elif k in UNSUPPORTED:
            if v is None or v == (None, None) or (isinstance(v, (list, dict)) and not v):
                continue
            raise ConfigError(f"SFTTrainer({k}=...) is not supported: {UNSUPPORTED[k]}")
        else:
            match = difflib.get_close_matches(k, SUPPORTED + sorted(IGNORED | set(UNSUPPORTED)), n=1)
            hint = f"; did you mean {match[0]!r}?" if match else f"; it takes {', '.join(SUPPORTED)}"
            raise TypeError(f"SFTTrainer() got an unexpected keyword argument {k!r}{hint}")


def map_model(g: Guidance, model, tok, tok_arg: str, model_init_kwargs: dict | None) -> None:
    if isinstance(model, (str, Path)):
        g.add(f"model={str(model)!r}", {"model.path": str(model)})
        if model_init_kwargs:
            g.add(f"model_init_kwargs={model_init_kwargs!r}", map_model_kwargs(model_init_kwargs))
    else:
        if model_init_kwargs:
            raise ConfigError("model_init_kwargs apply only when model is a name; this model is already loaded")
        path = getattr(model, "name_or_path", "") or ""
        g.add(f"model=<{type(model).__name__}>", {"model.path": path} if path else {},
              "" if path else "(built in memory: no key)")
        if not path:
            g.not_expressible.append("the model was built in memory (it has no name_or_path)")
            if tok is None:
                raise ConfigError(f"the model has no name_or_path to load its tokenizer from; pass {tok_arg}=...")
    if tok is not None:
        name = getattr(tok, "name_or_path", "") or ""
        own = name in ("", g.overrides.get("model.path"))
        g.add(f"{tok_arg}=<{type(tok).__name__}>", {} if own else {"model.tokenizer": name},
              "(the model's own)" if own else "")


def _map_data(g: Guidance, train_ds: datasets.Dataset, eval_ds: datasets.Dataset | None, data_collator,
              dataset_text_field: str | None, formatting_func: Callable | None) -> Format | None:
    """Datasets, collator and text source -> data keys, and the custom format if one is needed
    (``None``: the config's own format, built by the pipeline)."""
    g.overrides["data.path"] = "train_dataset"  # a label: the rows come from the trainer's Source
    g.add(f"train_dataset=<Dataset: {len(train_ds):,} rows>", None,
          "data.path=YOUR_DATA_FILE (and data.limit=N for .select(range(N)))")
    if eval_ds is not None:
        g.add(f"eval_dataset=<Dataset: {len(eval_ds):,} rows>", {"data.eval_split": "eval_dataset"},
              "(in a recipe: a split name of YOUR_DATA_FILE, or a fraction such as 0.05)")
    response = instruction = None
    if isinstance(data_collator, DataCollatorForCompletionOnlyLM):
        response, instruction = data_collator.response_template, data_collator.instruction_template
        g.add(f"data_collator={data_collator!r}", None,
              "loss after the template: the prompt / completion split (data.train_on_prompt=false)")
    elif isinstance(data_collator, DataCollatorForLanguageModeling) and not data_collator.mlm:
        g.add("data_collator=DataCollatorForLanguageModeling(mlm=False)", None,
              "the default: loss on every token, EOS included")
    elif data_collator is not None:
        raise ConfigError(f"data_collator={type(data_collator).__name__} is not supported: sftune builds its own "
                          "batches. For loss after a template use sftune.DataCollatorForCompletionOnlyLM; "
                          "otherwise leave data_collator out")
    if formatting_func is not None:
        if not callable(formatting_func):
            raise ConfigError(f"formatting_func must be a function, got {type(formatting_func).__name__}")
        fmt = FunctionFormat(formatting_func, response, instruction)
        legacy = f"formatting_func={getattr(formatting_func, '__name__', 'function')}"
        named = fmt.named = named_equivalent(fmt, train_ds)
        if named:
            keys = {"data.template": named} if response else {"data.template": named, "data.train_on_prompt": True}
            g.add(legacy, keys, "(gives the same text)")
        else:
            g.add(legacy, None, "no key: write its text as data.prompt / data.completion templates over the columns")
            g.not_expressible.append("formatting_func has no config equivalent")
        if dataset_text_field is not None:
            g.add(f"dataset_text_field={dataset_text_field!r}", None, "ignored: formatting_func is given")
        return fmt
    if dataset_text_field is not None and response is None:
        g.add(f"dataset_text_field={dataset_text_field!r}",
              {"data.format": "text", "data.text_column": dataset_text_field})
        return None
    if dataset_text_field is not None:
        keys = {"data.format": "text", "data.text_column": dataset_text_field, "data.response_template": response}
        if instruction is not None:
            keys["data.instruction_template"] = instruction
        g.add(f"dataset_text_field={dataset_text_field!r}", keys, "(with the collator's templates)")
        return None
    if response is not None:
        raise ConfigError("DataCollatorForCompletionOnlyLM needs the text to split: pass formatting_func= or "
                          "dataset_text_field=")
    g.add("(neither dataset_text_field nor formatting_func)", {"data.format": "auto"},
          "(detected from the columns: messages, prompt/completion, else text)")
    return None


# ----------------------------------------------------------------------------- building a run


@dataclass
class Built:
    """What a front made of its arguments: the config, and the objects ``training.train`` takes."""

    config: Config
    model: Any
    tokenizer: Any
    fmt: Format | None
    source: Source
    train_dataset: datasets.Dataset
    eval_dataset: datasets.Dataset | None
    guidance: Guidance


def load_and_adapt(g: Guidance, model, tok, peft_config) -> tuple[Config, Any, Any]:
    """Load what is named (tokenizer, model), then add LoRA: the config, model and tokenizer of the run."""
    cfg = load_config(None, g.overrides)
    if tok is None:
        tok, _ = load_tokenizer(cfg)
    else:
        ready_tokenizer(tok)
    if isinstance(model, (str, Path)):
        model = load_model(cfg, tok)
    if peft_config is not None:
        if hasattr(model, "peft_config"):
            raise ConfigError("the model already has adapters (a PeftModel); drop peft_config, or pass the "
                              "base model")
        g.add(f"peft_config={type(peft_config).__name__}(r={peft_config.r}, …)", map_peft(peft_config, model))
    elif hasattr(model, "peft_config"):
        g.overrides["lora.enabled"] = True  # so the final save writes the adapter
    config = load_config(None, g.overrides)
    if config.lora.enabled and not hasattr(model, "peft_config"):
        model = add_lora(config, model)
    return config, model, tok


def make_source(train_ds: datasets.Dataset, eval_ds: datasets.Dataset | None) -> Source:
    return Source(train=with_row_index(train_ds), eval=None if eval_ds is None else with_row_index(eval_ds),
                  name="train_dataset", rows_read=len(train_ds))


def build(model=None, args: TrainingArguments | None = None, data_collator=None,
          train_dataset: datasets.Dataset | None = None, eval_dataset: datasets.Dataset | None = None,
          tokenizer=None, *, processing_class=None, peft_config=None, dataset_text_field: str | None = None,
          formatting_func: Callable | None = None, max_seq_length: int | None = None, packing: bool = False,
          dataset_num_proc: int | None = None, model_init_kwargs: dict | None = None, **kwargs) -> Built:
    """TRL 0.7's ``SFTTrainer`` arguments -> a :class:`Built` run (the table is printed by the trainer)."""
    g = Guidance()
    _check_extra(kwargs, g)
    if model is None:
        raise ConfigError("SFTTrainer needs model=: a model object, or a hub id or local model directory")
    if train_dataset is None:
        raise ConfigError("SFTTrainer needs train_dataset= (a datasets.Dataset)")
    if args is None:
        args = TrainingArguments(output_dir="tmp_trainer")  # TRL's default
    elif not isinstance(args, TrainingArguments):
        raise ConfigError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise ConfigError("pass tokenizer= or processing_class=, not both")
    tok = processing_class if processing_class is not None else tokenizer
    train_ds = as_dataset(train_dataset, "train_dataset")
    eval_ds = None if eval_dataset is None else as_dataset(eval_dataset, "eval_dataset")

    map_model(g, model, tok, "processing_class" if processing_class is not None else "tokenizer",
               model_init_kwargs)
    map_training_args(args, len(train_ds), g)
    fmt = _map_data(g, train_ds, eval_ds, data_collator, dataset_text_field, formatting_func)
    if max_seq_length is not None:
        g.add(f"max_seq_length={max_seq_length}", {"data.max_length": int(max_seq_length)})
    if packing:
        g.add("packing=True", {"data.packing": True})
    if dataset_num_proc:
        g.add(f"dataset_num_proc={dataset_num_proc}", {"data.num_proc": int(dataset_num_proc)})
    config, model, tok = load_and_adapt(g, model, tok, peft_config)
    return Built(config, model, tok, fmt, make_source(train_ds, eval_ds), train_ds, eval_ds, g)
