"""Which kernel runs the per-example attention of a flat row, chosen per device.

``sftune.attention`` lays a micro-batch out as one flat row and gives every attention call the
examples' boundaries (``doc_bounds``). What runs inside that call is chosen once per run by
:func:`choose_attention`, from the device and the model's capabilities:

* ``flash``: on CUDA with ``flash_attn`` installed, transformers' own flash-attention varlen path
  (``_flash_attention_forward`` with ``cu_seq_lens`` = the boundaries, the same cumulative lengths
  transformers derives from the restarting ``position_ids``); honours windows and softcaps.
  **Written for CUDA, not run here** (no GPU in its development; ``tests/test_backends.py`` holds
  the GPU test, skipped without CUDA and flash_attn).
* ``flex``: on CUDA without flash_attn, ``torch.nn.attention.flex_attention`` with a document mask
  (plus the model's sliding window; softcap as a ``score_mod``). Compiled on CUDA. On CPU, torch
  2.13 runs FlexAttention forward only (no backward), eager at ~10x the per-example loop's time, so
  it is never chosen there; its masks are tested for equivalence on CPU in no-grad mode.
* ``loop``: one SDPA (or the family's eager) call per example: the CPU path, unchanged.

A call the chosen kernel cannot take (attention sinks, attention dropout under ``flex``, an
unknown per-call argument) runs through the loop, so every call stays exact. The start-up probe
(``sftune.probe``) then checks the chosen kernel against the model run one example at a time.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("flash", "flex", "loop")
_HANDLED = {"softcap"}  # per-call arguments flash and flex take (sliding_window is passed separately)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention(device, caps=None) -> tuple[str, str]:
    """``(backend, reason)`` for flat rows on ``device``. ``SFTUNE_ATTENTION`` (flash, flex, loop)
    overrides the choice (benchmarks, tests)."""
    forced = os.environ.get("SFTUNE_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SFTUNE_ATTENTION={forced}: expected one of {', '.join(BACKENDS)}")
        return forced, "SFTUNE_ATTENTION"
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return "loop", "per-example SDPA, the fastest on a CPU"
    if caps is not None and "s_aux" in caps.attention_args:
        return "loop", "the model's attention sinks need its own eager attention"
    if flash_available():
        return "flash", "flash_attn is installed"
    if flex_available():
        return "flex", "flash_attn is not installed"
    return "loop", "neither flash_attn nor FlexAttention is available"


def attention_line(backend: str, reason: str) -> str:
    what = {"flash": "flash-attention varlen (transformers), one flat row",
            "flex": "FlexAttention with a document mask, one flat row",
            "loop": "one attention call per example in one flat row"}[backend]
    return f"attention: {backend}: {what} ({reason})"


# ----------------------------------------------------------------------------- FlexAttention

_MASKS: dict = {}
_flex_compiled = None


def _flex_fn(device):
    """Compiled FlexAttention on CUDA (its fast kernel); eager elsewhere (CPU: forward only)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _flex_compiled is None:  # automatic dynamic shapes: a second row length compiles a dynamic kernel
        _flex_compiled = torch.compile(flex_attention)
    return _flex_compiled


def document_ids(doc_bounds, device) -> torch.Tensor:
    """``[T]``: the index of the example each position of the flat row belongs to."""
    lengths = torch.tensor([e - s for s, e in zip(doc_bounds[:-1], doc_bounds[1:])], device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def block_mask(doc_bounds, window: int | None, device):
    """The FlexAttention ``BlockMask`` of one flat row: causal, within the example (and the window,
    with transformers' convention ``q - window < k <= q``). Cached: every layer of a forward shares it."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (tuple(doc_bounds), window, str(device))
    if key in _MASKS:
        return _MASKS[key]
    doc = document_ids(doc_bounds, device)

    def mask_mod(b, h, q, k):
        keep = (doc[q] == doc[k]) & (k <= q)
        if window is not None:
            keep = keep & (k > q - window)
        return keep

    t = int(doc_bounds[-1])
    # on CUDA built block by block (compiled), never as a [T, T] tensor
    mask = create_block_mask(mask_mod, None, None, t, t, device=device, _compile=torch.device(device).type == "cuda")
    if len(_MASKS) >= 8:
        _MASKS.clear()
    _MASKS[key] = mask
    return mask


def flex_forward(module, query, key, value, doc_bounds, scaling, window, softcap=None) -> torch.Tensor:
    """Attention of a flat row ``[1, heads, T, d]`` -> ``[1, T, heads, d]`` through FlexAttention."""
    groups = query.shape[1] // key.shape[1]
    score_mod = None
    if softcap:
        def score_mod(score, b, h, q, k):
            return softcap * torch.tanh(score / softcap)
    mask = block_mask(doc_bounds, window, query.device)
    out = _flex_fn(query.device)(query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling,
                                 enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------- flash-attention

def flash_forward(module, query, key, value, doc_bounds, dropout, scaling, window, softcap=None) -> torch.Tensor:
    """transformers' flash-attention varlen path over one flat row (CUDA only; untested without a GPU)."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    cu = torch.tensor(doc_bounds, dtype=torch.int32, device=query.device)
    longest = max(e - s for s, e in zip(doc_bounds[:-1], doc_bounds[1:]))
    impl = "flash_attention_3" if importlib.util.find_spec("flash_attn_interface") else "flash_attention_2"
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    target = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    if q.dtype == torch.float32:  # flash-attention takes half precision only
        target = target or torch.bfloat16
        q, k, v = q.to(target), k.to(target), v.to(target)
    out = _flash_attention_forward(q, k, v, None, query_length=q.shape[1], is_causal=True, dropout=dropout,
                                   softmax_scale=scaling, sliding_window=window, softcap=softcap,
                                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
                                   attn_implementation=impl, target_dtype=target)
    return out.to(query.dtype)


def run(backend: str, module, query, key, value, doc_bounds, dropout, scaling, window, special) -> torch.Tensor | None:
    """The flat row's attention through ``backend``, or None when this call needs the loop."""
    if backend == "loop" or set(special) - _HANDLED or getattr(module, "sinks", None) is not None:
        return None
    softcap = special.get("softcap")
    if backend == "flex":
        if dropout and module.training:
            return None  # FlexAttention has no attention dropout
        return flex_forward(module, query, key, value, doc_bounds, scaling, window, softcap)
    if backend == "flash":
        return flash_forward(module, query, key, value, doc_bounds, dropout if module.training else 0.0, scaling,
                             window, softcap)
    return None
