"""Variable-length attention for packed rows, on any device, through transformers' attention interface.

sftune lays a micro-batch out as one flat row of examples whose ``position_ids`` restart at each
example. transformers' SDPA path would build a dense ``[T, T]`` block-diagonal mask for such a row
and attend over all of it (and on CPU, with attention dropout, fall back to a kernel that
materialises every ``T x T`` score). Here each example attends only to itself: one causal
``scaled_dot_product_attention`` per example, so the cost is the sum of ``len^2`` instead of
``(sum len)^2``, with the plain causal kernel. The result is the same attention (tested).

The function is registered under the name ``sftune_varlen`` (with SDPA's mask function, so
generation and any call without ``doc_bounds`` behave exactly like ``sdpa``). Models configured
for ``flash_attention_*`` keep it: flash-attention varlen already reads ``position_ids``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sftune_varlen"
_registered = False


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, doc_bounds: tuple[int, ...] | None = None, **kwargs):
    """``doc_bounds`` (cumulative example offsets of a single flat row) selects per-example causal
    attention; without it this is transformers' SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if doc_bounds is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: one key/value head serves several query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       dropout_p=dropout, scale=scaling)
        for s, e in zip(doc_bounds[:-1], doc_bounds[1:])
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def enable_varlen(model) -> bool:
    """Switch a model using SDPA (the transformers default) to per-example attention for packed
    rows. Returns whether the model now takes ``doc_bounds``."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == NAME:
        return True
    if impl not in ("sdpa", None) or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME
