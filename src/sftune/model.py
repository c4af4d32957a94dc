"""Load the tokenizer and model: pad token, chat template, dtype, from-scratch init and LoRA.

The pad token: when the tokenizer has none, EOS doubles as pad. That is safe here because labels
are built from segments, never from ``input_ids == pad_id``, so EOS labels are never masked, and
no token is added, so the embeddings are not resized. Embeddings are resized only when a token is
really added (for example the ``<|im_start|>``/``<|im_end|>`` of ``data.chat_template=chatml``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

from sftune.capabilities import lora_error_hint, lora_settings
from sftune.config import Config
from sftune.data.templates import resolve_chat_template
from sftune.errors import ConfigError, SftuneError
from sftune.console import console, is_main_process
from sftune.vision_model import attach_processor, model_class
from sftune.vision_inference import load_vision_model
from sftune.vision_parts import lora_targets, refuse_on_text_model

ASSETS = Path(__file__).parent / "assets"
log = logging.getLogger("sftune")


def resolve_path(path: str) -> str:
    """``builtin:NAME`` -> the asset directory shipped with sftune; anything else unchanged."""
    if path.startswith("builtin:"):
        d = ASSETS / path.split(":", 1)[1]
        if not d.is_dir():
            names = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise ConfigError(f"unknown built-in model '{path}'; built-in models: {', '.join(names)}")
        return str(d)
    return path


def _looks_local(path: str) -> bool:
    """A path a hub id cannot be: ``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``, ``C:\\x``."""
    return (path.startswith((".", "/", "~", os.sep)) or path.count("/") > 1 or "\\" in path
            or (len(path) > 1 and path[1] == ":"))


def _from_pretrained_error(what: str, path: str, e: Exception) -> SftuneError:
    if _looks_local(path) and not Path(path).expanduser().exists():
        return ConfigError(f"could not load the {what} '{path}': no such directory\n  → model.path must be an "
                           "existing model directory (with config.json) or a hub id such as distilgpt2")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return SftuneError(
        f"could not load the {what} '{path}': {first}\n  → check model.path; a hub id needs the network "
        "(or a filled cache), a local path must be a model directory with config.json"
    )


def load_tokenizer(cfg: Config):
    """Load the tokenizer and make it ready for training: pad token and chat template.

    Returns ``(tokenizer, n_added)``: ``n_added`` tokens were added to the vocabulary.
    """
    path = resolve_path(cfg.model.tokenizer or cfg.model.path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        raise _from_pretrained_error("tokenizer", path, e) from None
    n_added = 0
    ready_tokenizer(tok, f"the tokenizer '{path}'")
    if cfg.data.chat_template:
        template, needed = resolve_chat_template(cfg.data.chat_template)
        missing = [t for t in needed if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
        if missing:
            n_added += tok.add_special_tokens({"additional_special_tokens": missing},
                                              replace_extra_special_tokens=False)
        tok.chat_template = template
    tok.padding_side = "right"
    vlm = attach_processor(resolve_path(cfg.model.path), tok, revision=cfg.model.revision,  # vision-language models
                           trust_remote_code=cfg.model.trust_remote_code)
    if not vlm:  # vision.* keys on a text model: refused before the data
        refuse_on_text_model(cfg.vision, f"the model '{cfg.model.path}'")
    return tok, n_added


def ready_tokenizer(tok, what: str = "the tokenizer") -> None:
    """The one pad rule, for training and inference alike: an EOS is required (or the model could
    not learn to stop), and EOS doubles as pad when there is none (safe: see the module docstring)."""
    if tok.eos_token is None:
        raise SftuneError(f"{what} has no EOS token, so the model could not learn to stop; "
                          "use a tokenizer with an eos_token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def torch_dtype(name: str) -> torch.dtype:
    """``auto`` (float32 without a CUDA GPU, bfloat16 with one that supports it), or a dtype name."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pretrained(path: str, *, dtype: str = "auto", init_seed: int | None = None):
    """A saved model and its tokenizer, for inference and export: a full model directory, a LoRA
    adapter directory (``AutoPeftModelForCausalLM``), or, with ``init_seed``, a config-only model
    initialised exactly as a from-scratch run with that seed starts. Returns ``(model, tokenizer)``."""
    p = Path(path)
    dt = torch_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (model := load_vision_model(path, tokenizer, dt, init_seed)) is not None:
            pass  # an image-text-to-text model, its processor on the tokenizer (sftune.vision_inference)
        elif (p / "adapter_config.json").exists():
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dt)
        elif init_seed is not None:
            torch.manual_seed(init_seed)  # as load_model does for model.from_scratch
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SftuneError(f"could not load '{path}': {first}\n  → give a training output directory, a model "
                          "directory or a hub id") from None
    ready_tokenizer(tokenizer, f"the tokenizer of '{path}'")
    return model, tokenizer


def model_max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_max_length(cfg: Config, tokenizer, model_config=None) -> int:
    """``data.max_length``, or ``min(model max positions, tokenizer max length, 1024)``."""
    limits = [1024]
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    mp = model_max_positions(model_config) if model_config is not None else None
    if mp:
        limits.append(mp)
    if cfg.data.max_length is None:
        return min(limits)
    if mp and cfg.data.max_length > mp:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's {mp} positions; "
                          f"set data.max_length to at most {mp}")
    return cfg.data.max_length


def load_model_config(cfg: Config):
    path = resolve_path(cfg.model.path)
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        raise _from_pretrained_error("model config", path, e) from None


def _dtype(cfg: Config, device: torch.device) -> torch.dtype:
    name = cfg.model.dtype
    if name == "auto":
        if cfg.lora.enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def load_model(cfg: Config, tokenizer, n_added: int = 0, device: torch.device | None = None):
    """Load (or initialise) the causal LM, resize embeddings for added tokens, and add LoRA."""
    device = device or torch.device("cpu")
    path = resolve_path(cfg.model.path)
    dtype = _dtype(cfg, device)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.lora.load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(cfg, device)
    config = load_model_config(cfg)
    auto = model_class(config)  # image-text-to-text models load whole (sftune.vision_model)
    if cfg.model.from_scratch:
        torch.manual_seed(cfg.train.seed)
        model = auto.from_config(config, **kwargs)
    else:
        try:
            model = auto.from_pretrained(path, revision=cfg.model.revision, **kwargs)
        except Exception as e:
            raise _from_pretrained_error("model", path, e) from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if n_added or len(tokenizer) > vocab:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = add_lora(cfg, model)
    return model


def fast_activations(model) -> int:
    """Swap transformers' Python tanh-GELU (``gelu_new``: pow, mul, tanh, each kept for backward)
    for the same function as one fused torch kernel (``GELUTanh``). Faster, far less activation
    memory, same values to float rounding; the saved config is unchanged. Returns the count."""
    swapped = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def _bnb_config(cfg: Config, device: torch.device):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("lora.load_in_4bit (QLoRA) needs bitsandbytes: pip install 'sftune[qlora]'") from None
    if device.type != "cuda":
        raise ConfigError("lora.load_in_4bit (QLoRA) needs a CUDA GPU; on CPU, use plain LoRA (lora.enabled=true)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def add_lora(cfg: Config, model):
    if not cfg.lora.enabled and cfg.lora.load_in_4bit:
        raise ConfigError("lora.load_in_4bit needs lora.enabled=true")
    if cfg.lora.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


    # what peft refuses for this family: modules left out of all-linear, dropout 0 on expert parameters
    adjust, notes = lora_settings(model, cfg.lora)
    kwargs = dict(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                  target_modules=cfg.lora.target_modules, modules_to_save=cfg.lora.modules_to_save,
                  fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),  # GPT-2 style layers
                  task_type="CAUSAL_LM")
    kwargs.update(adjust)
    if (targets := lora_targets(cfg, model, (torch.nn.Linear, Conv1D))) is not None:  # vision.lora_parts
        kwargs["target_modules"] = targets
    if notes and is_main_process():
        for note in notes:
            console.print(note)
    try:
        return get_peft_model(model, LoraConfig(**kwargs))
    except ValueError as e:
        raise ConfigError(f"LoRA could not be applied: {e}\n  → {lora_error_hint(str(e))}") from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def unwrap_causal_lm(model):
    """The transformers ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
