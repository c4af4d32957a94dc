"""The TRL 1.x front: ``SFTConfig`` (TRL's fields and defaults) and the mapping of a TRL 1.x call.

A TRL 1.x script runs with one changed import::

    from sftune import SFTTrainer, SFTConfig   # was: from trl import SFTTrainer, SFTConfig

:class:`SFTConfig` is ``transformers.TrainingArguments`` with TRL 1.16's SFT fields and defaults
(``learning_rate=2e-5``, ``logging_steps=10``, ``max_length=1024``, ``bf16`` on unless ``fp16``
(off where no GPU runs bf16, where TRL's would refuse to start), ``gradient_checkpointing=True``). It is only a carrier of arguments: :func:`build` maps every field
onto sftune's one :class:`~sftune.config.Config` (printed as a table, as the 0.7 front does),
honours it with TRL's meaning, or refuses it with what to use instead.

The data follows TRL's dataset types, recognised from the columns as TRL does:

* language modelling: a text column (``dataset_text_field``), or a ``formatting_func``; EOS appended
  and the whole text trained;
* prompt-completion (strings): loss on the completion (``completion_only_loss`` None or True), EOS
  appended; ``completion_only_loss=False`` trains the prompt too;
* conversational (``messages``, ShareGPT ``conversations``, or ``prompt``/``completion`` message
  lists), with an optional ``tools`` column and per-row ``chat_template_kwargs``: the whole rendered
  conversation is trained (TRL's default), or only the assistant turns with ``assistant_only_loss``;
  conversational prompt-completion trains the completion messages;
* pre-tokenized ``input_ids`` (with ``completion_mask`` / ``assistant_masks``, or ``labels``):
  trained as given (:mod:`sftune.data.pretokenized`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import datasets
from transformers import TrainingArguments

from sftune.compat.trl07 import (
    Built,
    Guidance,
    as_dataset,
    map_model,
    load_and_adapt,
    make_source,
    map_training_args,
)
from sftune.config import DataConfig
from sftune.data.formats import FunctionFormat
from sftune.errors import ConfigError
from sftune.model import model_max_positions

# ----------------------------------------------------------------------------- the config


@dataclass
class SFTConfig(TrainingArguments):
    """TRL 1.x's ``SFTConfig``: ``TrainingArguments`` plus the SFT fields, with TRL's defaults.

    Every field is read by :func:`build` when the trainer is made: mapped onto sftune's config,
    honoured, or refused with the reason (see the table the trainer prints)."""

    learning_rate: float = field(default=2e-5, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (or a ratio < 1)."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations to save memory."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; None: True unless fp16."})
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "Extra scheduler arguments."})

    model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "Keyword arguments for from_pretrained when model is a name."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    router_aux_loss_coef: float | None = field(default=None, metadata={"help": "MoE load-balancing loss weight."})
    chat_template_path: str | None = field(default=None, metadata={
        "help": "A tokenizer directory or a .jinja file whose chat template is used."})
    dataset_text_field: str = field(default="text", metadata={"help": "Column of text data."})
    dataset_kwargs: dict[str, Any] | str | None = field(default=None, metadata={"help": "Dataset preparation options."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenisation."})
    eos_token: str | None = field(default=None, metadata={"help": "End-of-sequence token (default: the tokenizer's)."})
    max_length: int | None = field(default=1024, metadata={"help": "Longest tokenized sequence."})
    truncation_mode: str = field(default="keep_start", metadata={"help": "keep_start (keep_end is deprecated)."})
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the dataset before training."})
    packing: bool = field(default=False, metadata={"help": "Pack sequences into max_length blocks."})
    packing_strategy: str = field(default="bfd", metadata={"help": "bfd, bfd_split or wrapped."})
    padding_free: bool = field(default=False, metadata={"help": "Flatten the batch into one row without padding."})
    pad_to_multiple_of: int | str | None = field(default="auto", metadata={"help": "Pad rows to a multiple."})
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval set (None: as packing)."})
    completion_only_loss: bool | None = field(default=None, metadata={
        "help": "Loss on the completion only (None: on for prompt-completion data)."})
    assistant_only_loss: bool = field(default=False, metadata={"help": "Loss on the assistant turns only."})
    loss_type: str = field(default="nll", metadata={"help": "nll (dft is not supported by sftune)."})
    activation_offloading: bool = field(default=False, metadata={"help": "Offload activations to the CPU."})
    pad_token: str | None = field(default=None, metadata={"help": "Deprecated in TRL: set tokenizer.pad_token."})

    def __post_init__(self):
        if self.bf16 is None:  # TRL: True unless fp16; where no GPU can run bf16 (TRL would refuse), False
            import torch

            self.bf16 = not self.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        for name in ("model_init_kwargs", "dataset_kwargs", "lr_scheduler_kwargs"):  # the CLI passes JSON strings
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, json.loads(value))
        if self.loss_type == "chunked_nll":  # TRL's deprecated spelling of nll
            self.loss_type = "nll"
        if self.packing_strategy == "bfd-requeue":
            self.packing_strategy = "bfd_split"
        super().__post_init__()


SFT_FIELDS = frozenset(f.name for f in dataclasses.fields(SFTConfig)) - frozenset(
    f.name for f in dataclasses.fields(TrainingArguments))
# TrainingArguments fields whose default SFTConfig overrides, or that this front reads itself
# (the other changed fields are listed as ignored in the table)
OWN_FIELDS = SFT_FIELDS | {"lr_scheduler_kwargs", "use_liger_kernel", "neftune_noise_alpha", "push_to_hub",
                           "hub_model_id", "gradient_checkpointing", "gradient_checkpointing_kwargs", "optim"}

# What a TRL 1.x field becomes when it cannot be honoured: the reason and what to use instead.
REFUSED = {
    "loss_type": "only loss_type='nll' is supported (sftune's fused cross-entropy); DFT is not implemented",
    "activation_offloading": "activation offloading is not supported; gradient checkpointing "
                             "(gradient_checkpointing=True, model.gradient_checkpointing) saves activation memory",
    "truncation_mode": "only truncation_mode='keep_start' is supported (TRL deprecates keep_end too)",
    "packing_strategy": "only packing_strategy='bfd' is supported: sftune packs whole examples best-fit-decreasing "
                        "and never cuts one across sequences",
    "router_aux_loss_coef": "MoE auxiliary losses are not supported by sftune; leave router_aux_loss_coef unset",
    "pad_token": "set tokenizer.pad_token and pass the tokenizer as processing_class",
    "dataset_kwargs": "sftune prepares the data itself (skip_prepare_dataset is not supported): pass rows, or "
                      "pre-tokenized input_ids with completion_mask/labels",
    "lr_scheduler_kwargs": "scheduler arguments are not supported; sftune has linear, cosine and constant schedules",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented in sftune",
}
UNSUPPORTED_ARGS = {  # SFTTrainer arguments of TRL 1.x that sftune cannot honour, when given
    "compute_loss_func": "sftune computes the token cross-entropy itself (fused, on the loss positions only)",
    "compute_metrics": "sftune reports eval loss and perplexity; 'sftune eval RUN --data FILE' adds generation "
                       "metrics",
    "preprocess_logits_for_metrics": "sftune never materialises logits; 'sftune eval' computes generation metrics",
    "optimizers": "sftune uses AdamW with args.learning_rate, weight_decay, adam_beta1/2 and lr_scheduler_type",
    "optimizer_cls_and_kwargs": "sftune uses AdamW (optim='adamw_torch' or 'adamw_bnb_8bit')",
    "quantization_config": "for 4-bit QLoRA pass a LoraConfig and set model_init_kwargs={'load_in_4bit': True}",
    "model_init": "pass the model, or its name, as model=",
}


def _data_keys() -> set[str]:
    return set(DataConfig.model_fields)


# ----------------------------------------------------------------------------- the dataset type


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and \
        ("role" in value[0] or "from" in value[0])


def dataset_type(ds: datasets.Dataset, text_field: str) -> str:
    """TRL's dataset types, from the columns and the first row: ``tokenized``, ``conversational``,
    ``conversational_prompt_completion``, ``prompt_completion`` or ``language_modeling``."""
    columns = ds.column_names
    if "input_ids" in columns:
        return "tokenized"
    first = ds[0] if len(ds) else {}
    if "prompt" in columns and "completion" in columns:
        return "conversational_prompt_completion" if _is_conversation(first.get("prompt")) else "prompt_completion"
    for c in ("messages", "conversations"):
        if c in columns:
            return "conversational"
    if "prompt" in columns and text_field not in columns:
        raise ConfigError("the dataset has a 'prompt' column but no 'completion' column; TRL's prompt-only "
                          "datasets are for preference or RL training, not SFT")
    if text_field not in columns:
        raise ConfigError(f"the dataset has no {text_field!r} column (its columns: {', '.join(columns)}); set "
                          "SFTConfig(dataset_text_field=...) or pass formatting_func=")
    return "language_modeling"


def _sharegpt(messages: list[dict]) -> list[dict]:
    """ShareGPT ``{"from", "value"}`` turns -> ``{"role", "content"}`` (TRL's maybe_convert_to_chatml)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
    out = []
    for m in messages:
        if "from" in m and "role" not in m:
            m = {"role": roles.get(m["from"], m["from"]), "content": m.get("value")}
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class ConversationText:
    """A row's whole conversation rendered by the chat template (tools and per-row kwargs included):
    TRL's language modelling on conversational data, every token trained."""

    def __init__(self, tokenizer, column: str | None):
        self.tokenizer, self.column = tokenizer, column

    def __call__(self, row: dict) -> str:
        messages = row[self.column] if self.column else list(row["prompt"]) + list(row["completion"])
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = row.get("chat_template_kwargs") or {}
        return self.tokenizer.apply_chat_template(_sharegpt(messages), tokenize=False, tools=tools, **kwargs)


# ----------------------------------------------------------------------------- mapping


def _map_sft_fields(args: SFTConfig, g: Guidance, tok) -> None:
    """The SFT fields that do not depend on the data."""
    ref = SFTConfig(output_dir=args.output_dir)
    for name, reason in REFUSED.items():
        value = getattr(args, name, None)
        if value != getattr(ref, name, None) and value not in (None, {}, []) or \
                (name == "dataset_kwargs" and value and value.get("skip_prepare_dataset")):
            raise ConfigError(f"SFTConfig({name}={value!r}) is not supported: {reason}")
    g.add(f"args.max_length={args.max_length}",
          {"data.max_length": args.max_length} if args.max_length else {},
          "" if args.max_length else "(None: sftune uses the model's positions, at most 1024)")
    if args.packing:
        g.add(f"args.packing=True, packing_strategy={args.packing_strategy!r}", {"data.packing": True},
              "(best-fit decreasing; examples never attend to each other)")
    if args.padding_free:
        g.add("args.padding_free=True", None, "honoured: sftune flattens rows without padding where the attention "
              "supports it (chosen and checked at start-up)")
    if args.eval_packing is not None and args.eval_packing != args.packing:
        g.add(f"args.eval_packing={args.eval_packing}", None, "the eval loss is the same packed or not")
    if isinstance(args.pad_to_multiple_of, int):
        g.add(f"args.pad_to_multiple_of={args.pad_to_multiple_of}", {"train.bucket": args.pad_to_multiple_of})
    if args.dataset_num_proc:
        g.add(f"args.dataset_num_proc={args.dataset_num_proc}", {"data.num_proc": int(args.dataset_num_proc)})
    if args.shuffle_dataset:
        g.add("args.shuffle_dataset=True", {"data.shuffle": True, "data.seed": int(args.seed)})
    if args.use_liger_kernel:
        g.add("args.use_liger_kernel=True", {"model.kernels": "liger"})
    if args.trust_remote_code:
        g.add("args.trust_remote_code=True", {"model.trust_remote_code": True})
    if args.eos_token is not None and tok is not None and args.eos_token != tok.eos_token:
        raise ConfigError(f"SFTConfig(eos_token={args.eos_token!r}) differs from the tokenizer's "
                          f"{tok.eos_token!r}: set tokenizer.eos_token and pass it as processing_class")
    if args.chat_template_path:
        g.add(f"args.chat_template_path={args.chat_template_path!r}",
              {"data.chat_template": _chat_template(args.chat_template_path)})
    if args.gradient_checkpointing:
        same = args.gradient_checkpointing_kwargs in (None, {}, {"use_reentrant": False})
        g.add("args.gradient_checkpointing=True", {"model.gradient_checkpointing": "auto"},
              "(TRL's default; sftune turns it on when the activations do not fit" +
              ("" if same else "; gradient_checkpointing_kwargs ignored") + ")")
    else:
        g.add("args.gradient_checkpointing=False", {"model.gradient_checkpointing": False})
    if args.optim not in ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"):
        raise ConfigError(f"SFTConfig(optim={args.optim!r}) is not supported: sftune trains with AdamW "
                          "(optim='adamw_torch', or 'adamw_bnb_8bit' for 8-bit states)")
    if args.optim == "adamw_bnb_8bit":
        g.add("args.optim='adamw_bnb_8bit'", {"train.optimizer": "adamw_8bit"})
    if args.push_to_hub:
        g.add("args.push_to_hub=True", None, "after training, the model in output_dir is uploaded "
              f"to {args.hub_model_id or Path(args.output_dir).name!r}")


def _chat_template(path: str) -> str:
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        return Path(path).read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(path).chat_template
    if not template:
        raise ConfigError(f"chat_template_path={path!r}: that tokenizer has no chat template")
    return template


def _map_data(g: Guidance, args: SFTConfig, train_ds: datasets.Dataset, formatting_func: Callable | None, tok):
    """The dataset type -> data keys, and a custom format where one is needed. Returns the format
    (or ``None``) and a function that prepares each dataset (the pre-tokenized type)."""
    g.overrides["data.path"] = "train_dataset"
    g.add(f"train_dataset=<Dataset: {len(train_ds):,} rows>", None,
          "data.path=YOUR_DATA_FILE (and data.limit=N for .select(range(N)))")
    cols = train_ds.column_names
    if formatting_func is not None:
        if not callable(formatting_func):
            raise ConfigError(f"formatting_func must be a function, got {type(formatting_func).__name__}")
        if "input_ids" in cols:
            raise ConfigError("formatting_func is given but the dataset is already tokenized (input_ids); drop one")
        g.add(f"formatting_func={getattr(formatting_func, '__name__', 'function')}", {"data.format": "text"},
              "(its text trained whole, EOS appended, as TRL does)")
        g.not_expressible.append("formatting_func has no config equivalent")
        return FunctionFormat(formatting_func)
    kind = dataset_type(train_ds, args.dataset_text_field)
    completion_only = args.completion_only_loss
    if completion_only and kind not in ("prompt_completion", "conversational_prompt_completion", "tokenized"):
        raise ConfigError(f"completion_only_loss=True needs prompt-completion data; this dataset is {kind}")
    if args.assistant_only_loss and kind not in ("conversational", "conversational_prompt_completion", "tokenized"):
        raise ConfigError(f"assistant_only_loss=True needs conversational data (messages); this dataset is {kind}")
    if kind == "tokenized":
        from sftune.data.pretokenized import PretokenizedFormat

        # TRL: completion_mask applies with completion_only_loss=True, or None and prompt/completion columns
        fmt = PretokenizedFormat(completion_only=completion_only is True or (
            completion_only is None and {"prompt", "completion"} <= set(cols)))
        g.add("(dataset with input_ids)", None, f"pre-tokenized: {fmt.describe(cols)}")
        g.not_expressible.append("pre-tokenized rows have no config equivalent")
        return fmt
    if kind == "language_modeling":
        g.add(f"args.dataset_text_field={args.dataset_text_field!r}",
              {"data.format": "text", "data.text_column": args.dataset_text_field},
              "(language modelling: the whole text trained, EOS appended)")
        return None
    if kind == "prompt_completion":
        keys = {"data.format": "prompt_completion", "data.prompt": "prompt", "data.completion": "completion"}
        if completion_only is False:
            keys["data.train_on_prompt"] = True
        g.add(f"(prompt/completion columns), completion_only_loss={completion_only}", keys,
              "(EOS appended to the completion)")
        return None
    column = "messages" if "messages" in cols else "conversations" if kind == "conversational" else None
    extra = [c for c in ("tools", "chat_template_kwargs") if c in cols]
    if not args.assistant_only_loss and not (kind == "conversational_prompt_completion" and completion_only
                                             is not False):
        fmt = FunctionFormat(ConversationText(tok, column), add_eos=False)
        fmt.add_bos = False  # the chat template writes its own special tokens
        g.add(f"({column or 'prompt/completion messages'}), assistant_only_loss=False", {"data.format": "text"},
              "(the whole rendered conversation trained, as TRL does; "
              "assistant_only_loss=True trains the replies only)")
        g.not_expressible.append("training the whole rendered conversation has no config key")
        return fmt
    keys = {"data.format": "messages", "data.train_on": "all_assistant"}
    if column is not None:
        keys["data.messages_column"] = column
    for c in extra:  # data.tools_column names the column; a chat_template_kwargs column is read per row
        key = {"tools": "tools_column", "chat_template_kwargs": "chat_template_kwargs"}[c]
        if key not in _data_keys():
            raise ConfigError(f"the dataset has a {c!r} column, which needs data.{key} (not in this sftune "
                              "version); train the whole conversation instead (assistant_only_loss=False)")
        if c == "tools":
            keys["data.tools_column"] = c
    if kind == "conversational_prompt_completion":
        keys["data.messages_column"] = "messages"
        g.add("(prompt/completion messages), completion_only_loss", keys,
              "(the completion's assistant turns trained; the prompt's turns are context)")
        return "prompt_completion_messages"
    g.add(f"({column}), assistant_only_loss=True", keys, "(every assistant turn trained, with its end of turn)")
    return None


def prompt_completion_messages(ds: datasets.Dataset) -> datasets.Dataset:
    """Conversational prompt-completion rows -> one ``messages`` list whose prompt turns carry
    ``"train": false`` (context only), as TRL's completion mask has it."""
    def join(row):
        prompt = [{**m, "train": False} for m in _sharegpt(row["prompt"])]
        completion = [{**m, "train": True} for m in _sharegpt(row["completion"])]
        return {"messages": prompt + completion}
    return ds.map(join, remove_columns=["prompt", "completion"])


def build(model, args: SFTConfig, data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
          *, peft_config=None, formatting_func: Callable | None = None, **kwargs) -> Built:
    """TRL 1.x's ``SFTTrainer`` arguments -> a :class:`~sftune.compat.trl07.Built` run."""
    g = Guidance("TRL 1.x")
    g.overrides["eval.samples"] = 0  # Trainer's evaluation computes the loss only: no sample generations
    for k, v in kwargs.items():
        if k not in UNSUPPORTED_ARGS:
            raise TypeError(f"SFTTrainer() got an unexpected keyword argument {k!r}")
        if v is None or v == (None, None) or (isinstance(v, (list, dict)) and not v):
            continue
        raise ConfigError(f"SFTTrainer({k}=...) is not supported: {UNSUPPORTED_ARGS[k]}")
    if model is None:
        raise ConfigError("SFTTrainer needs model: a model object, or a hub id or local model directory")
    if train_dataset is None:
        raise ConfigError("SFTTrainer needs train_dataset (a datasets.Dataset)")
    if data_collator is not None:
        raise ConfigError(f"data_collator={type(data_collator).__name__} is not supported: sftune builds its own "
                          "batches (padding-free, exact masks); leave data_collator out")
    train_ds = as_dataset(train_dataset, "train_dataset")
    if isinstance(eval_dataset, dict):
        raise ConfigError("eval_dataset is a dict of datasets; pass one datasets.Dataset")
    eval_ds = None if eval_dataset is None else as_dataset(eval_dataset, "eval_dataset")
    tok = processing_class

    map_model(g, model, tok, "processing_class", args.model_init_kwargs)

    map_training_args(args, len(train_ds), g, ref=SFTConfig(output_dir=args.output_dir), handled=OWN_FIELDS)
    if eval_ds is not None:
        g.add(f"eval_dataset=<Dataset: {len(eval_ds):,} rows>", {"data.eval_split": "eval_dataset"},
              "(in a recipe: a split name of YOUR_DATA_FILE, or a fraction such as 0.05)")
    _map_sft_fields(args, g, tok)
    if tok is None:  # the data mapping needs the tokenizer (chat templates); load it as the config names it
        from sftune.config import load_config
        from sftune.model import load_tokenizer

        tok, _ = load_tokenizer(load_config(None, g.overrides))
    fmt = _map_data(g, args, train_ds, formatting_func, tok)
    if fmt == "prompt_completion_messages":
        fmt = None
        train_ds = prompt_completion_messages(train_ds)
        eval_ds = None if eval_ds is None else prompt_completion_messages(eval_ds)
    config, model, tok = load_and_adapt(g, model, tok, peft_config)
    positions = model_max_positions(model.config)
    if args.max_length and positions and args.max_length > positions:  # TRL would never reach it; sftune refuses
        config.data.max_length = positions
        g.add(f"args.max_length={args.max_length}", {"data.max_length": positions},
              f"(the model has {positions} positions: no sequence can be longer)")
    return Built(config, model, tok, fmt, make_source(train_ds, eval_ds), train_ds, eval_ds, g)
