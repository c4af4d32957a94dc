"""Speed and memory options, each optional: 8-bit AdamW, Liger kernels, bucketed row lengths, the
activation estimate behind ``gradient_checkpointing=auto``, and peak GPU memory in the metrics.

Liger: sftune keeps its own fused lm_head + cross-entropy (``sftune.loss``) and takes only Liger's
RMSNorm, RoPE and SwiGLU/GeGLU kernels. sftune never calls the model's ``forward`` for the loss: it
runs the body and computes the loss on the loss positions only, in fp32 chunks, with per-token
weights; Liger's fused linear cross-entropy replaces the model's ``forward`` and would be bypassed
(and it knows neither the loss positions nor the weights). Both fused losses avoid ``[tokens, vocab]``
logits, so nothing is lost by keeping sftune's.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from sftune.errors import ConfigError

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True,
                 "cross_entropy": False, "fused_linear_cross_entropy": False}
"""What ``model.kernels=liger`` patches (sftune's fused loss stays; see the module docstring)."""


def adamw_8bit(groups, kw: dict, device: torch.device):
    """bitsandbytes' 8-bit AdamW (optimizer states in 8 bits, blockwise quantised): CUDA only."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes: pip install 'sftune[gpu]' "
                          "(or pip install bitsandbytes), or set train.optimizer=adamw")
    if torch.device(device).type != "cuda":
        raise ConfigError("train.optimizer=adamw_8bit runs on CUDA GPUs only (bitsandbytes); on this "
                          f"{torch.device(device).type} device set train.optimizer=adamw")
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(groups, **kw)


def apply_kernels(kernels: str, model, device=None):
    """Patch ``model`` (plain or peft) with the kernels asked for (``none`` or ``liger``); returns it."""
    if kernels in (None, "none"):
        return model
    if kernels != "liger":
        raise ConfigError(f"model.kernels={kernels}: expected none or liger")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.kernels=liger needs liger-kernel: pip install 'sftune[gpu]' "
                          "(or pip install liger-kernel), or set model.kernels=none")
    if device is not None and torch.device(device).type != "cuda":
        raise ConfigError("model.kernels=liger runs on CUDA GPUs only (Triton kernels); set model.kernels=none")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"model.kernels=liger: liger-kernel has no kernels for {model_type} (it supports "
                          f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); set model.kernels=none")
    import inspect

    fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
    accepted = inspect.signature(fn).parameters
    _apply_liger_kernel_to_instance(model=base, **{k: v for k, v in LIGER_KERNELS.items() if k in accepted})
    return model


def activation_bytes(model_config, tokens: int, rows: int, seq: int, device: torch.device,
                     mixed_precision: str = "no", fused_attention: bool = False) -> int:
    """Activation memory of one micro-batch without checkpointing: ~34 values per token and hidden
    unit per layer (fp32: 4 bytes; bf16/fp16 autocast: ~2.5 on average, norms and the residual
    stream stay fp32), plus the ``[heads, seq, seq]`` attention scores unless a fused kernel
    (flash-attention, FlexAttention, SDPA's memory-efficient kernels on CUDA) never stores them."""
    d = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 768)
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 12)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", 12)
    half = torch.device(device).type == "cuda" and mixed_precision in ("bf16", "fp16", "auto")
    per_value = 2.5 if half else 4.0
    scores = 0 if fused_attention else rows * heads * seq * seq * 5
    return int(layers * (tokens * d * 34 + scores) * per_value / 2)


def bucket_for(cfg, model=None) -> int:
    """``train.bucket``: ``auto`` is 128 with ``train.compile`` or when ``model``'s flat rows run
    through the compiled FlexAttention kernel (``sftune.backends``), else 0 (the CPU path: no padding)."""
    from sftune.attention import get_backend

    b = cfg.train.bucket
    flex = model is not None and get_backend(model) == "flex"
    return (128 if cfg.train.compile or flex else 0) if b == "auto" else int(b)


def available_bytes(device: torch.device) -> int:
    """Free memory on the device: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def needs_checkpointing(cfg, model_config, max_length: int, device, model=None) -> bool:
    """``gradient_checkpointing=auto``: whether one micro-batch's activations would take more than
    60% of the memory left. On a GPU that is the free memory (the model is loaded) less what the
    first step still allocates: gradients (parameter dtype) and optimizer states (8 bytes per
    trainable fp32 parameter, 2 with 8-bit AdamW)."""
    if cfg.model.gradient_checkpointing != "auto":
        return bool(cfg.model.gradient_checkpointing)
    device = torch.device(device)
    rows = cfg.train.batch_size
    # on CUDA every attention path (flash, FlexAttention, SDPA's fused kernels) keeps no [seq, seq] scores
    need = activation_bytes(model_config, rows * max_length, rows, max_length, device, cfg.train.mixed_precision,
                            fused_attention=device.type == "cuda")
    free = available_bytes(device)
    if device.type == "cuda" and model is not None:
        for p in model.parameters():
            if p.requires_grad:
                state = 2 if cfg.train.optimizer == "adamw_8bit" else 2 * p.element_size()
                free -= p.numel() * (p.element_size() + state)
    return need > 0.6 * max(free, 0)


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_metrics(device) -> dict:
    """Peak GPU memory since the start (or the last :func:`reset_peak`), for metrics.jsonl; {} off CUDA."""
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
