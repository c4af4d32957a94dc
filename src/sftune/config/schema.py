"""The one typed config: a pydantic schema with a docstring on every field.

:class:`Config` holds the sections ``model``, ``lora``, ``data``, ``train``, ``eval``, ``distill`` and ``vision``; YAML
recipes mirror them. Loading (recipes, ``key=value`` overrides, closest-key suggestions) is in
:mod:`sftune.config.loading`.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from sftune.config.distill import DistillConfig
from sftune.config.roles import PER_SOURCE, PerSource, Section as _Section, Tokenizing, Untrained
from sftune.config.train import EvalConfig, TrainConfig
from sftune.config.vision import VisionConfig


class ModelConfig(_Section):
    path: str = "distilgpt2"
    """Hub id (``distilgpt2``), a local model directory, or ``builtin:quickstart`` (the tiny model
    shipped with sftune; ``builtin:quickstart-small``: half its depth, the distillation
    demonstration's student)."""

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
    path: PerSource[str] = "imdb"
    """Hub dataset id, a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a directory of
    them, or ``builtin:quickstart`` (the generated quickstart tasks; ``builtin:quickstart-noisy``: the
    same with one training answer in five wrong, for the distillation demonstration)."""

    name: PerSource[str | None] = None
    """Hub dataset configuration name, when the dataset has several."""

    split: PerSource[str] = "train"
    """Split to train on."""

    eval_split: Union[float, str, None] = None
    """Held-out evaluation data: a fraction of the training rows (``0.05``) or a split name
    (``test``)."""

    limit: PerSource[int | None] = Field(None, ge=1)
    """Use only the first N rows of the training split (after shuffling, when ``shuffle``)."""

    eval_limit: int | None = Field(None, ge=1)
    """Use only the first N rows of the evaluation data."""

    remove_columns: PerSource[list[str]] = []
    """Columns to drop right after loading."""

    shuffle: PerSource[bool] = False
    """Shuffle the rows (with ``data.seed``) before ``limit`` and the eval split."""

    seed: PerSource[int] = 42
    """Seed for ``shuffle`` and a fractional ``eval_split``."""

    format: Tokenizing[Literal["auto", "text", "prompt_completion", "messages"]] = "auto"
    """How rows become training text. ``auto`` picks ``messages`` when a ``messages`` or
    ``conversations`` column exists, ``prompt_completion`` when ``template``, ``prompt`` or
    ``completion`` is set, and ``text`` otherwise."""

    text_column: Tokenizing[str] = "text"
    """Column trained on by the ``text`` format."""

    template: Tokenizing[str | None] = None
    """Named prompt/completion template: ``qa``, ``alpaca`` or ``alpaca_h4``."""

    prompt: Tokenizing[str | None] = None
    """Prompt for ``prompt_completion``: a column name, or a template over columns such as
    ``"### Question: {instruction}\\n ### Answer:"``. Write ``{{`` and ``}}`` for literal braces."""

    completion: Tokenizing[str | None] = None
    """Completion for ``prompt_completion``: a column name or a template such as ``" {output}"``."""

    train_on_prompt: Tokenizing[bool] = False
    """Put the loss on the prompt too (the whole text), as the tutorial's third mode does."""

    messages_column: Tokenizing[str | None] = None
    """Column of chat messages. ``None`` finds ``messages`` or ``conversations`` (ShareGPT).
    A message may carry ``reasoning_content`` (trained where the chat template writes it),
    ``"train": false`` (context only) or a float ``"weight"`` (its tokens' share of the loss)."""

    tools_column: Tokenizing[str | None] = None
    """Column of tool schemas for the ``messages`` format: a list of JSON schemas (or a JSON string
    of one), passed as ``tools=`` to every render of its row (training, preview, eval prompts).
    ``None`` uses a ``tools`` column when there is one."""

    chat_template_kwargs: Tokenizing[dict[str, Any]] = {}
    """Extra arguments for every render of the chat template (``enable_thinking``,
    ``builtin_tools``, ``date_string``, ...). A row's ``chat_template_kwargs`` column (an object or
    a JSON string of one) is merged over these, key by key."""

    train_reasoning: Tokenizing[bool] = True
    """Train an assistant message's ``reasoning_content`` where the chat template writes it;
    ``false`` keeps it in the context but puts no loss on its text."""

    stop_token: Tokenizing[str | None] = None
    """For the ``messages`` format: the token generation stops on after an assistant turn, for a
    chat template that writes no end-of-turn token (its models stop on the token that opens the
    next message). Must be one token of the tokenizer; trained at the end of each such turn and
    used as a stop at inference. ``None``: the tokenizer's EOS, the model's
    ``generation_config.json`` EOS ids and the template's own end tokens decide, and a turn none of
    them ends is a bad row."""

    train_on: Tokenizing[Literal["all_assistant", "last_assistant"]] = "all_assistant"
    """Which assistant turns of a conversation carry loss: every one, or only the last (with
    tools: the last assistant turn of each trajectory, usually the final answer)."""

    response_template: Tokenizing[str | None] = None
    """For the ``text`` format: put the loss only after the last occurrence of this string in
    each text (TRL's completion-only collator, ``" ### Answer:"``). A text without it is a
    counted skip."""

    instruction_template: Tokenizing[str | None] = None
    """With ``response_template``, multi-turn text: the loss goes on every span from a response
    template up to the next instruction template (``"### Human:"``)."""

    chat_template: Tokenizing[str | None] = None
    """Chat template for ``messages`` when the tokenizer has none: a named template (``chatml``;
    ``chatml_tools`` adds Qwen2.5-style tool calling)
    or a Jinja string. When the tokenizer has its own, this replaces it."""

    max_length: int | None = Field(None, ge=2)
    """Longest training sequence in tokens. ``None`` is ``min(model max positions, 1024)``.
    Longer examples lose the tail of their completion; an example whose prompt alone does not fit
    is skipped. Both are counted and reported."""

    packing: bool = False
    """Pack several examples into each sequence of ``max_length`` (best-fit-decreasing over the
    whole dataset). Examples never attend to each other: positions restart at each example."""

    add_eos: Tokenizing[bool] = True
    """Append the tokenizer's EOS to text and completions, with a label, so the model learns to
    stop. (Chat data ends each assistant turn with the template's end-of-turn token instead.)"""

    on_bad_row: Tokenizing[Literal["error", "skip"]] = "error"
    """What a malformed row does (a non-string field, a conversation without an assistant turn):
    stop with an error naming the row, or skip it and count it. Rows with an empty or null
    completion are always skipped and counted."""

    encoding: PerSource[str] = "utf-8"
    """Text encoding of local ``.json``/``.jsonl``/``.csv`` files (for example ``latin-1`` or
    ``cp1252``)."""

    num_proc: Untrained[int | None] = Field(None, ge=1)
    """Processes for tokenisation. ``None`` uses one process for small data and up to the CPU
    count for large data."""

    images_column: Tokenizing[str] = "images"
    """Vision-language models: the column holding each row's images, in order of appearance of the
    ``{"type": "image"}`` parts (or ``<image>`` placeholders) of its messages. An image is a file
    path (relative to the data file), bytes, or a ``datasets`` Image value."""

    image_max_pixels: Tokenizing[int | None] = Field(None, ge=1)
    """Vision-language models with dynamic resolution (Qwen2-VL family): the most pixels an image
    is resized to (passed to the processor); fewer pixels, fewer image tokens. ``None``: the
    processor's own setting."""

    image_min_pixels: Tokenizing[int | None] = Field(None, ge=1)
    """Vision-language models with dynamic resolution: the fewest pixels an image is resized to
    (passed to the processor). ``None``: the processor's own setting."""

    sources: list[SourceConfig] | None = None
    """Several datasets mixed by weight (``sftune.data.mixture``): a list of entries, each with its
    own data keys (``path``, ``split``, ``template``, ``limit``, ...; unset keys inherit the
    top-level ``data.*`` value), a ``weight`` (the target share of training examples) and an
    optional display ``label``. ``None``: the top-level keys are the one source."""

    streaming: bool = False
    """Read the sources as streams (local JSONL / JSON / CSV / Parquet files, a directory or a glob,
    and hub datasets): tokenized and packed in a bounded window, never copied to Arrow, so memory
    and the time to the first step do not grow with the data. Needs ``train.max_steps``."""

    pack_buffer: int = Field(1024, ge=1)
    """Streaming: examples gathered before they are packed (best-fit-decreasing within the window)
    when ``packing``. A larger window pads less (the last sequences of a window are the emptiest)
    and holds more examples in memory."""

    shuffle_buffer: int = Field(1000, ge=1)
    """Streaming: rows held per source to shuffle the stream (each row read replaces a random one
    in the buffer). 1 reads the rows in order."""

    @field_validator("eval_split")
    @classmethod
    def _check_eval_split(cls, v):
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fractional eval_split must be between 0 and 1, for example 0.05")
        return v

    @model_validator(mode="after")
    def _check_image_pixels(self):
        if self.image_min_pixels and self.image_max_pixels and self.image_min_pixels > self.image_max_pixels:
            raise ValueError(f"data.image_min_pixels={self.image_min_pixels} is above data.image_max_pixels="
                             f"{self.image_max_pixels}; make the minimum at most the maximum")
        return self

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _parse_template_kwargs(cls, v):
        if isinstance(v, str):  # from the command line: data.chat_template_kwargs='{enable_thinking: false}'
            import yaml

            try:
                return yaml.safe_load(v)
            except yaml.YAMLError:
                pass
        return v


SOURCE_KEYS = tuple(k for k, f in DataConfig.model_fields.items() if PER_SOURCE in f.metadata)
"""The data keys a ``data.sources`` entry may set for itself (the :data:`PER_SOURCE` fields of :class:`DataConfig`)."""


def _source_fields() -> dict:
    fields = {}
    for key in SOURCE_KEYS:
        f = DataConfig.model_fields[key]
        fields[key] = (f.annotation | None, Field(None, description=f"{f.description}\n\nUnset: ``data.{key}``."))
    return fields


class _SourceBase(_Section):
    weight: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Target share of the training examples drawn from this source, relative to the other
    sources' weights (normalised to sum to 1), decided before packing."""

    label: str | None = None
    """Display name in reports and ``preview --json`` (default: the source's path)."""


SourceConfig = create_model("SourceConfig", __base__=_SourceBase, __module__=__name__, **_source_fields())
"""One entry of ``data.sources``: the per-source data keys (:data:`SOURCE_KEYS`), ``weight`` and
``label``."""
DataConfig.model_rebuild()


class Config(_Section):
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

    distill: DistillConfig = DistillConfig()
    """Distillation from a teacher (off unless ``distill.teacher`` or ``distill.saved`` is set)."""
    vision: VisionConfig = VisionConfig()
    """Image-text-to-text models: freezing, learning rates, LoRA and checkpointing per part."""

    @model_validator(mode="after")
    def _defaults(self):
        if self.train.output_dir is None:
            self.train.output_dir = f"runs/{self.recipe or 'sftune'}"
        return self

    @model_validator(mode="after")
    def _sources_not_empty(self):
        # (data.streaming's need of train.max_steps is training's: sftune.data.chain.plan; preview needs none)
        if self.data.sources is not None and not self.data.sources:
            raise ValueError("data.sources is an empty list: give at least one source, or leave it unset")
        return self

