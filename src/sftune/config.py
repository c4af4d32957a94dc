"""The one typed config: a pydantic schema, loaded from a YAML recipe plus ``key=value`` overrides.

A recipe is a YAML file (or a built-in name: ``quickstart``, ``imdb``, ``codealpaca``, ``alpaca``)
whose sections mirror :class:`SFTConfig`. Overrides use dotted keys, for example
``data.max_length=256 train.lr=1e-4``. Values are parsed as YAML scalars (``true``, ``3``,
``[a, b]``). An unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftune.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(_Section):
    path: str = "distilgpt2"
    """Hub id (``distilgpt2``), a local model directory, or ``builtin:quickstart`` (the tiny model
    shipped with sftune)."""

    tokenizer: str | None = None
    """Tokenizer to load, when it differs from ``model.path``."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of the model."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the loaded weights. ``auto`` is float32 for full fine-tuning, and bfloat16 for a
    LoRA base model on a GPU that supports it. Train in float32 on CPU.

    What is stored in which precision (with ``train.mixed_precision``):

    * ``float32`` weights (full fine-tuning, ``auto``): weights, gradients and AdamW states
      (``train.optimizer=adamw``) in fp32, 16 bytes per parameter; with ``mixed_precision=bf16``
      the matmuls and attention run in bf16 (autocast) and activations are mostly bf16. Like TRL's
      ``bf16=True`` on an fp32 model.
    * ``bfloat16`` / ``float16`` weights: weights, gradients and AdamW states in that dtype (8 bytes
      per parameter): half the memory, but updates smaller than the weights' rounding step are
      lost; for short runs or LoRA base models.
    * LoRA: the frozen base in ``dtype`` (bf16 on a GPU by ``auto``; 4-bit with
      ``lora.load_in_4bit``), the adapters, their gradients and AdamW states in fp32.
    * ``train.optimizer=adamw_8bit``: the two AdamW states in 8 bits (blockwise-quantised) instead
      of the parameter dtype.

    The fused lm_head + cross-entropy always accumulates the loss and the head's weight gradient
    in fp32 (or fp64 for fp64 models), whatever the weights' dtype."""

    kernels: Literal["none", "liger"] = "none"
    """Extra kernels patched into the model. ``liger``: liger-kernel's RMSNorm, RoPE and SwiGLU
    Triton kernels (CUDA only; ``pip install 'sftune[gpu]'``) for the families Liger supports
    (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...). sftune's own fused lm_head + cross-entropy is
    kept (Liger's would be bypassed: sftune computes the loss on the loss positions only)."""

    attn_implementation: str | None = None
    """Attention kernel passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
    ``None`` keeps the transformers default (SDPA)."""

    from_scratch: bool = False
    """Initialise the weights from the model config with ``train.seed`` instead of loading
    pretrained weights (used by the quickstart and the benchmarks)."""

    trust_remote_code: bool = False
    """Allow model code from the hub repository to run."""

    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    """Recompute activations in the backward pass to save memory. ``auto`` turns it on only when
    the estimated activation memory of one micro-batch does not fit the device: on a GPU, the free
    memory after loading the model, less the gradients and optimizer states still to come, with
    bf16 activations under ``train.mixed_precision`` and no ``[seq, seq]`` scores in flat rows
    (flash-attention, FlexAttention and the per-example loop never store them)."""

    check: Literal["auto", "strict", "off"] = "auto"
    """Start-up equivalence check: before the first step, a few of the run's own examples go through
    the chosen row layout and loss and are compared with the model run one example at a time.
    ``auto`` falls back to a safer layout (or the unfused loss) on a mismatch and says so;
    ``strict`` refuses to train instead; ``off`` skips the check (a few forwards)."""


class LoraConfig(_Section):
    enabled: bool = False
    """Train LoRA adapters (through peft) instead of all weights."""

    r: int = Field(16, ge=1)
    """LoRA rank."""

    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (the update is scaled by ``alpha / r``)."""

    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    target_modules: Union[str, list[str]] = "all-linear"
    """Modules that get adapters: ``all-linear`` (every linear layer except the output head) or a
    list of module names such as ``[c_attn, c_proj]``."""

    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (for example ``[lm_head]``)."""

    load_in_4bit: bool = False
    """QLoRA: load the base model in 4-bit NF4 (needs bitsandbytes and a CUDA GPU)."""

    merge: bool = False
    """At the final save, merge the adapter into the base weights and save a plain model."""


class DataConfig(_Section):
    path: str = "imdb"
    """Hub dataset id, a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a directory of
    them, or ``builtin:quickstart`` (the generated quickstart tasks)."""

    name: str | None = None
    """Hub dataset configuration name, when the dataset has several."""

    split: str = "train"
    """Split to train on."""

    eval_split: Union[float, str, None] = None
    """Held-out evaluation data: a fraction of the training rows (``0.05``) or a split name
    (``test``)."""

    limit: int | None = Field(None, ge=1)
    """Use only the first N rows of the training split (after shuffling, when ``shuffle``)."""

    eval_limit: int | None = Field(None, ge=1)
    """Use only the first N rows of the evaluation data."""

    remove_columns: list[str] = []
    """Columns to drop right after loading."""

    shuffle: bool = False
    """Shuffle the rows (with ``data.seed``) before ``limit`` and the eval split."""

    seed: int = 42
    """Seed for ``shuffle`` and a fractional ``eval_split``."""

    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    """How rows become training text. ``auto`` picks ``messages`` when a ``messages`` or
    ``conversations`` column exists, ``prompt_completion`` when ``template``, ``prompt`` or
    ``completion`` is set, and ``text`` otherwise."""

    text_column: str = "text"
    """Column trained on by the ``text`` format."""

    template: str | None = None
    """Named prompt/completion template: ``qa``, ``alpaca`` or ``alpaca_h4``."""

    prompt: str | None = None
    """Prompt for ``prompt_completion``: a column name, or a template over columns such as
    ``"### Question: {instruction}\\n ### Answer:"``. Write ``{{`` and ``}}`` for literal braces."""

    completion: str | None = None
    """Completion for ``prompt_completion``: a column name or a template such as ``" {output}"``."""

    train_on_prompt: bool = False
    """Put the loss on the prompt too (the whole text), as the tutorial's third mode does."""

    messages_column: str | None = None
    """Column of chat messages. ``None`` finds ``messages`` or ``conversations`` (ShareGPT).
    A message may carry ``reasoning_content`` (trained where the chat template writes it),
    ``"train": false`` (context only) or a float ``"weight"`` (its tokens' share of the loss)."""

    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns of a conversation carry loss: every one, or only the last."""

    response_template: str | None = None
    """For the ``text`` format: put the loss only after the last occurrence of this string in
    each text (TRL's completion-only collator, ``" ### Answer:"``). A text without it is a
    counted skip."""

    instruction_template: str | None = None
    """With ``response_template``, multi-turn text: the loss goes on every span from a response
    template up to the next instruction template (``"### Human:"``)."""

    chat_template: str | None = None
    """Chat template for ``messages`` when the tokenizer has none: a named template (``chatml``)
    or a Jinja string. When the tokenizer has its own, this replaces it."""

    max_length: int | None = Field(None, ge=2)
    """Longest training sequence in tokens. ``None`` is ``min(model max positions, 1024)``.
    Longer examples lose the tail of their completion; an example whose prompt alone does not fit
    is skipped. Both are counted and reported."""

    packing: bool = False
    """Pack several examples into each sequence of ``max_length`` (best-fit-decreasing over the
    whole dataset). Examples never attend to each other: positions restart at each example."""

    add_eos: bool = True
    """Append the tokenizer's EOS to text and completions, with a label, so the model learns to
    stop. (Chat data ends each assistant turn with the template's end-of-turn token instead.)"""

    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed row does (a non-string field, a conversation without an assistant turn):
    stop with an error naming the row, or skip it and count it. Rows with an empty or null
    completion are always skipped and counted."""

    encoding: str = "utf-8"
    """Text encoding of local ``.json``/``.jsonl``/``.csv`` files (for example ``latin-1`` or
    ``cp1252``)."""

    num_proc: int | None = Field(None, ge=1)
    """Processes for tokenisation. ``None`` uses one process for small data and up to the CPU
    count for large data."""

    @field_validator("eval_split")
    @classmethod
    def _check_eval_split(cls, v):
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fractional eval_split must be between 0 and 1, for example 0.05")
        return v


class TrainConfig(_Section):
    output_dir: str | None = None
    """Where checkpoints, metrics and the final model go. ``None`` is ``runs/<recipe name>``."""

    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    """Passes over the training data (ignored when ``max_steps`` is set)."""

    max_steps: int | None = Field(None, ge=1)
    """Number of optimizer steps; overrides ``epochs``."""

    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch on each device (packed sequences when ``data.packing``)."""

    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""

    lr: float = Field(5e-5, gt=0, allow_inf_nan=False)
    """Peak learning rate."""

    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    """AdamW weight decay; never applied to biases and norm weights."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    adam_eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    """AdamW epsilon."""

    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""

    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0 (used when ``warmup_steps`` is 0)."""

    warmup_steps: int = Field(0, ge=0)
    """Warmup steps; overrides ``warmup_ratio``."""

    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value; ``None`` turns clipping off."""

    seed: int = 42
    """Seed for weight initialisation, dropout and the data order."""

    log_every: int = Field(10, ge=1)
    """Log train loss, learning rate and tokens/s every N steps."""

    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the eval split every N steps (and at the end). ``None``: only at the end."""

    save_every: int | None = Field(None, ge=1)
    """Save a checkpoint every N steps. ``None``: no intermediate checkpoints."""

    keep_checkpoints: int = Field(2, ge=1)
    """Keep only the newest K checkpoints."""

    resume: bool = False
    """Continue from the newest checkpoint in ``output_dir``."""

    report_to: list[Literal["tensorboard", "wandb"]] = []
    """Extra metric loggers. Metrics always go to ``output_dir/metrics.jsonl``."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision of the forward and backward (through accelerate). ``auto`` is ``bf16`` on
    a GPU that supports it (as TRL's default), ``no`` (fp32) on CPU and on GPUs without bf16.
    ``bf16``/``fp16`` run matmuls and attention in half precision while the weights, gradients and
    optimizer states stay in ``model.dtype`` (see there); ``fp16`` adds loss scaling. The fused
    loss accumulates in fp32 in every setting."""

    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """``adamw``: torch's fused AdamW, states in the parameters' dtype. ``adamw_8bit``:
    bitsandbytes' 8-bit AdamW (the two states in 8 bits: 2 instead of 8 bytes per fp32
    parameter); CUDA only, ``pip install 'sftune[gpu]'``."""

    compile: bool = False
    """Run the model through ``torch.compile``."""

    bucket: Union[int, Literal["auto"]] = "auto"
    """Pad each micro-batch's rows to a multiple of this many tokens (padding carries no loss and
    changes no example's result), so ``torch.compile`` meets a few shapes instead of one per
    batch. ``auto``: 128 with ``train.compile``, else 0 (no padding)."""

    num_threads: int | None = Field(None, ge=1)
    """CPU threads for torch. ``None`` keeps torch's default."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a non-finite (NaN or infinite) loss or gradient norm does: ``stop`` ends the run with an
    error naming the step and the value, keeps the last good checkpoint and writes no final model;
    ``skip`` drops that step's update (the weights and optimizer state stay as they were), counts
    it, and stops once more than ``max_skipped_steps`` steps were skipped."""

    max_skipped_steps: int = Field(10, ge=0)
    """With ``on_nonfinite=skip``: the most steps that may be skipped before the run stops."""


class EvalConfig(_Section):
    exact_match: bool = False
    """Generate greedily for the eval prompts and report exact-match accuracy before and after
    training (prompt/completion data)."""

    limit: int | None = Field(200, ge=1)
    """Eval examples used for generation metrics."""

    max_new_tokens: int = Field(64, ge=1)
    """Longest generation."""

    batch_size: int = Field(32, ge=1)
    """Prompts per generation batch."""

    samples: int = Field(3, ge=0)
    """Sample generations shown and logged at each evaluation."""


class SFTConfig(_Section):
    """The whole configuration of a run. YAML recipes mirror these sections."""

    recipe: str | None = None
    """Name of the recipe this config came from (set by the loader)."""

    model: ModelConfig = ModelConfig()
    """The model and tokenizer."""

    lora: LoraConfig = LoraConfig()
    """LoRA / QLoRA adapters."""

    data: DataConfig = DataConfig()
    """Data source, format and sequence building."""

    train: TrainConfig = TrainConfig()
    """The training loop."""

    eval: EvalConfig = EvalConfig()
    """Generation-based evaluation."""

    @model_validator(mode="after")
    def _defaults(self):
        if self.train.output_dir is None:
            self.train.output_dir = f"runs/{self.recipe or 'sftune'}"
        return self


# ----------------------------------------------------------------------------- key helpers


def _section_models() -> dict[str, type[BaseModel]]:
    return {
        name: field.annotation
        for name, field in SFTConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def valid_keys() -> list[str]:
    """All dotted keys of the schema, e.g. ``data.max_length``."""
    keys = [k for k, f in SFTConfig.model_fields.items() if k not in _section_models()]
    for section, model in _section_models().items():
        keys += [f"{section}.{k}" for k in model.model_fields]
    return keys


def describe_keys() -> list[tuple[str, str, str]]:
    """``(key, default, description)`` for every config key (used by docs and ``--help``)."""
    rows = []
    for section, model in _section_models().items():
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
    model = _section_models().get(section)
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
    sections = _section_models()
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' in {source} must be a mapping of keys, got {value!r}.")
            for sub in value:
                if sub not in sections[key].model_fields:
                    raise _unknown_key_error(f"{key}.{sub}", source, value[sub])
        elif key not in SFTConfig.model_fields:
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


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) > 2:
        raise _unknown_key_error(key, "the command line")
    if len(parts) == 1:
        raw[key] = value
        return
    section, name = parts
    if section not in _section_models():
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


def load_config(recipe: str | Path | None = None, overrides: list[str] | dict | None = None) -> SFTConfig:
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
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(raw, key, value)
    _check_keys(raw, "the command line")
    if name and not raw.get("recipe"):
        raw["recipe"] = name
    return validate_config(raw, source, overridden={k for k, _ in items})


def validate_config(raw: dict, source: str = "the config", overridden: set[str] | None = None) -> SFTConfig:
    """Validate ``raw``; an invalid value is blamed on the command line when an override set it
    (``overridden`` holds those dotted keys), else on ``source``."""
    try:
        return SFTConfig.model_validate(raw)
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


def config_to_yaml(cfg: SFTConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
