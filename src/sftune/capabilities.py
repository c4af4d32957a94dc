"""What a loaded model can take: the one place that knows it.

sftune batches examples in one of three row layouts, fastest first:

* ``flat``: one flat row per micro-batch, each example attending only to itself through
  ``sftune.attention`` (per-example attention that honours windows, softcaps and sinks);
* ``rows``: several examples per row, with example boundaries left to transformers, which reads
  them from the restarting ``position_ids`` (SDPA/eager masks, flash-attention varlen);
* ``per_example``: one example per row, right-padded: always exact for a causal model.

Which of them is exact depends on the model: a convolution or state-space layer (LFM2, Falcon-H1,
GraniteMoeHybrid, Mamba, ...) carries state from one example into the next in any shared row;
some model bodies (gpt-oss, OPT) never give ``position_ids`` to mask creation, so in a shared row
examples see each other. The loss needs to know the logit transforms applied after ``lm_head``
(softcaps, scales, multipliers): the fused lm_head + cross-entropy in ``sftune.loss`` skips them.
LoRA needs to know what peft refuses for the family. :func:`capabilities` derives all of it from
the model's config, modules and source where it can, and from the small tables below where it
cannot; the start-up probe (``sftune.probe``) then checks the choice on the run's own data.

What changes between transformers versions is read from the installed version, never tabled:
whether attention goes through transformers' interface, whether the layers pass keyword arguments
(the example boundaries) on to it (:func:`kwargs_lost`), whether masks read ``position_ids``. The
tables hold only facts of the architecture. :func:`body_of` finds the transformer body (what the
fused loss reads) also where a family stores it under another name than it declares.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

from torch import nn

from sftune.attention import NAMES

LAYOUTS = ("flat", "rows", "per_example")
"""Row layouts, fastest (and least safe) first."""

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier_scale", "logit_softcapping", "mup_width_multiplier")
"""Config attributes that change the logits after ``lm_head`` (an unset or neutral value is ignored)."""

RECURRENT_TYPES = {"lfm2", "lfm2_moe", "falcon_h1", "granitemoehybrid", "jamba", "bamba", "zamba", "zamba2",
                   "mamba", "mamba2", "falcon_mamba", "nemotron_h", "qwen3_next", "rwkv", "recurrent_gemma",
                   "xlstm", "minimax", "kimi_linear"}
"""Model types with a token-mixing state (convolution, SSM, linear attention) besides attention."""

ROWS_UNSAFE_TYPES = {"gpt_oss", "opt"}
"""Model types whose body builds its attention mask without ``position_ids`` (checked in the source too)."""

PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
PEFT_MAMBA_REFUSED = ("out_proj", "conv1d")
"""peft refuses LoRA on these module names for these model types (peft's ``_check_lora_target_modules_mamba``)."""

_RECURRENT_CLASS = re.compile(r"Mamba|Mixer$|ShortConv|GatedDeltaNet|LinearAttention|Rwkv|RecurrentBlock|Rglru|xLSTM")


@dataclass(frozen=True)
class Capabilities:
    """What one model can take. ``layouts`` lists the safe row layouts, preferred first."""

    model_type: str
    layouts: tuple[str, ...]
    why_not: dict[str, str] = field(default_factory=dict)
    """Layouts left out, with the reason."""
    window: int | None = None
    """The smallest attention window of any layer (None: full attention everywhere)."""
    attention_args: tuple[str, ...] = ()
    """Per-call attention arguments the per-example attention passes on (window, softcap, sinks)."""
    logit_transforms: tuple[str, ...] = ()
    """Transforms applied after ``lm_head``: the fused loss cannot be used."""
    fused_loss: bool = True
    lora_exclude: tuple[str, ...] = ()
    """Module names peft refuses for LoRA on this family (left out of ``all-linear``)."""
    lora_dropout_zero: str | None = None
    """Why LoRA dropout must be 0 (peft wraps expert parameters, which take no dropout), or None."""

    @property
    def layout(self) -> str:
        return self.layouts[0]


def _config(model):
    return getattr(model, "config", None)


def _text_config(cfg):
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def logit_transforms(cfg) -> tuple[str, ...]:
    """The logit transforms a config asks for: softcaps (any value) and scales/multipliers != 1."""
    cfg = _text_config(cfg)
    found = []
    for name in LOGIT_TRANSFORMS:
        v = getattr(cfg, name, None)
        if v is None or v is False:
            continue
        if "softcap" in name or (isinstance(v, (int, float)) and float(v) != 1.0):
            found.append(name)
    return tuple(found)


def body_of(lm) -> nn.Module | None:
    """The transformer body of a causal LM: the module whose output has ``last_hidden_state``.

    ``base_model`` reads the attribute that ``base_model_prefix`` names, and returns the model
    itself when that attribute is absent; some families declare their body under one name and
    store it under another (Llama 4 and Mllama declare ``language_model`` and hold ``model``), and
    there ``base_model`` and ``get_decoder()`` both return the whole causal LM. Then the body is the
    child module that holds the input embeddings. None when no such child exists."""
    for get in (lambda: lm.base_model, lambda: lm.get_decoder()):
        try:
            body = get()
        except Exception:  # noqa: BLE001 - not every model defines them
            continue
        if isinstance(body, nn.Module) and body is not lm:
            return body
    get_emb = getattr(lm, "get_input_embeddings", None)
    try:
        emb = get_emb() if callable(get_emb) else None
    except Exception:  # noqa: BLE001
        emb = None
    for _, child in lm.named_children():
        if child is not emb and any(m is emb for m in child.modules()) and emb is not None:
            return child
    return None


def recurrent_layers(model) -> list[str]:
    """Names of token-mixing layers with state (convolutions, SSMs): they cross example boundaries."""
    cfg = _text_config(_config(model))
    found, names = [], []
    for name, module in model.named_modules():
        if name and (isinstance(module, nn.Conv1d) or _RECURRENT_CLASS.search(type(module).__name__)):
            if not any(name.startswith(f + ".") for f in names):
                names.append(name)
                found.append(f"{type(module).__name__} ({name})")
    types = [t for t in (getattr(cfg, "layer_types", None) or []) if isinstance(t, str)]
    if any("attention" not in t for t in types) and not found:
        found.append("layer_types: " + ", ".join(sorted(set(types))))
    if getattr(cfg, "model_type", "") in RECURRENT_TYPES and not found:
        found.append(cfg.model_type)
    return found


def window_of(cfg) -> int | None:
    """The active attention window: ``sliding_window`` when some layer uses it."""
    cfg = _text_config(cfg)
    window = getattr(cfg, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    types = getattr(cfg, "layer_types", None)
    if types and not any("sliding" in str(t) for t in types):
        return None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return window


def mask_reads_positions(model) -> bool:
    """Whether the model body passes ``position_ids`` to every mask it builds (so transformers can
    find the example boundaries of a shared row). Read from the body's ``forward`` source."""
    cfg = _config(model)
    if getattr(cfg, "model_type", None) in ROWS_UNSAFE_TYPES:
        return False
    body = body_of(model) or model
    try:
        src = inspect.getsource(type(body).forward)
    except (OSError, TypeError):
        return False
    calls = []
    for m in re.finditer(r"\b\w+\(", src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        args = src[m.end():i]
        if "bidirectional" in m.group() or "encoder" in args:
            continue  # cross-attention over an encoder: not the causal mask
        if ("config=" in args and "embeds" in args and "(" not in args) or re.search(r"^\s*\*\*\w*mask_kwargs", args):
            calls.append(args)  # a mask-creation call
    dicts = [src[m.start():src.find("}", m.start())] for m in re.finditer(r"\w*mask_kwargs = \{", src)]
    if not calls:
        return False
    return all("position_ids" in args or (args.strip().startswith("**") and dicts
                                          and all("position_ids" in d for d in dicts)) for args in calls)


def _call_args(src: str, callee: str) -> list[str]:
    """The argument text of every call ``callee(...)`` in ``src``."""
    out = []
    for m in re.finditer(re.escape(callee) + r"\(", src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        out.append(src[m.end():i])
    return out


def _forward_source(module) -> str | None:
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return None


def kwargs_lost(model) -> str | None:
    """Where the installed modeling code drops extra keyword arguments on their way to attention
    (the example boundaries of a flat row travel as one): ``"FalconDecoderLayer -> self_attention"``,
    or None when every attention layer and its caller pass ``**kwargs`` on (or the source cannot
    be read; the probe then decides). Read from the installed transformers' source, so it follows
    the version: Falcon's layers went through the attention interface in 5.25, without passing
    keyword arguments on."""
    scope = None
    try:
        scope = model.get_decoder()  # the text decoder: a vision tower's attention runs no flat row
    except Exception:  # noqa: BLE001 - not every model defines it
        pass
    if not isinstance(scope, nn.Module) or scope is model:
        scope = body_of(model) or model
    modules = dict(scope.named_modules())
    seen = set()
    for name, module in modules.items():
        key = type(module)
        if key in seen or not name:
            continue
        src = _forward_source(module)
        if not src or "attention_interface(" not in src:
            continue
        seen.add(key)
        if not all("**" in args for args in _call_args(src, "attention_interface")):
            return f"{type(module).__name__} -> attention"
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name)
        if parent is None or isinstance(parent, (nn.ModuleList, nn.ModuleDict)):
            continue
        parent_src = _forward_source(parent)
        calls = _call_args(parent_src or "", f"self.{attr}")
        if calls and not all("**" in args for args in calls):
            return f"{type(parent).__name__} -> {attr}"
    return None


def expert_parameters(model) -> bool:
    """Whether the model holds experts as 3-D parameters (transformers 5 MoE), which peft's
    ``all-linear`` wraps as parameters."""
    return any(p.ndim == 3 for n, p in model.named_parameters() if "expert" in n)


def capabilities(model, *, kernel: str | None = None, compile: bool = False) -> Capabilities:
    """Capabilities of a loaded causal LM (plain or peft-wrapped). ``kernel`` is the attention
    implementation the user chose (None: the transformers default); ``compile`` rules out ``flat``
    (each new set of example boundaries would recompile)."""
    get_base = getattr(model, "get_base_model", None)  # peft wrapper -> the transformers model
    lm = get_base() if callable(get_base) else model
    cfg = _config(lm)
    text = _text_config(cfg)
    model_type = getattr(text, "model_type", None) or getattr(cfg, "model_type", "?")
    impl = getattr(cfg, "_attn_implementation", None)
    why: dict[str, str] = {}
    recurrent = recurrent_layers(lm)
    if recurrent:
        reason = f"its {recurrent[0]} layer carries state from one example into the next in a shared row"
        why = {"flat": reason, "rows": reason}
    else:
        if kernel not in (None, "sdpa", "eager"):
            why["flat"] = f"model.attn_implementation={kernel} was chosen"
        elif compile:
            why["flat"] = "train.compile would recompile for every new set of example boundaries"
        elif impl not in (None, "sdpa", "eager", *NAMES) or not hasattr(lm, "set_attn_implementation") \
                or not getattr(type(lm), "_can_set_attn_implementation", lambda: True)():
            why["flat"] = f"its attention ({impl}) does not go through transformers' attention interface"
        elif lost := kwargs_lost(lm):
            why["flat"] = (f"its layers do not pass keyword arguments on to attention ({lost}), so per-example "
                           "attention would not see the example boundaries")
        if not str(impl).startswith("flash_attention") and not mask_reads_positions(lm):
            why["rows"] = "its body builds attention masks without position_ids, so examples in a row see each other"
    layouts = tuple(x for x in LAYOUTS if x not in why)
    args = []
    if window_of(cfg):
        args.append("sliding_window")
    if getattr(text, "attn_logit_softcapping", None):
        args.append("softcap")
    if any(n.endswith("sinks") for n, _ in lm.named_parameters()):
        args.append("s_aux")
    transforms = logit_transforms(cfg)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    fused = not transforms and isinstance(head, nn.Linear) and body_of(lm) is not None
    exclude = PEFT_MAMBA_REFUSED if model_type in PEFT_MAMBA_TYPES else ()
    dropout_zero = None
    if expert_parameters(lm):
        dropout_zero = f"peft applies no dropout to the expert parameters of {model_type}"
    return Capabilities(model_type, layouts, why, window_of(cfg), tuple(args), transforms, fused, exclude,
                        dropout_zero)


def lora_settings(model, lora) -> tuple[dict, list[str]]:
    """Adjustments to a LoRA config for this model: ``(LoraConfig kwargs, notes to print)``."""
    caps = capabilities(model)
    kwargs, notes = {}, []
    if lora.target_modules == "all-linear" and caps.lora_exclude:
        kwargs["exclude_modules"] = list(caps.lora_exclude)
        notes.append(f"LoRA all-linear leaves out {', '.join(caps.lora_exclude)} (peft refuses them on {caps.model_type})")
    targets_experts = lora.target_modules == "all-linear" or "experts" in str(lora.target_modules)
    if caps.lora_dropout_zero and targets_experts and lora.dropout:
        kwargs["lora_dropout"] = 0.0
        notes.append(f"lora.dropout {lora.dropout} -> 0: {caps.lora_dropout_zero}")
    return kwargs, notes


def lora_error_hint(message: str) -> str:
    """The setting that fixes a peft refusal."""
    if "lora_dropout" in message:
        return "set lora.dropout=0 (peft applies no dropout to expert parameters)"
    if "incompatible with Mamba" in message:
        return (f"remove {' and '.join(PEFT_MAMBA_REFUSED)} from lora.target_modules "
                "(all-linear leaves them out for this family)")
    return "check lora.target_modules"
