"""Variable-length attention for packed rows, on any device, through transformers' attention interface.

sftune can lay a micro-batch out as one flat row of examples whose ``position_ids`` restart at each
example. transformers' SDPA path would build a dense ``[T, T]`` block-diagonal mask for such a row
and attend over all of it. Here each example attends only to itself: one attention call per
example, so the cost is the sum of ``len^2`` instead of ``(sum len)^2``.

Each per-example call is the attention the model itself would run on that example alone:

* the causal mask, narrowed to the layer's ``sliding_window`` when the layer has one (Mistral,
  Qwen2, Phi-3, Gemma 2/3, gpt-oss), with transformers' convention ``q - window < k <= q``;
* plain causal SDPA when nothing else is asked, else the model family's own
  ``eager_attention_forward`` with that mask, so per-call arguments the family reads (Gemma 2's
  ``softcap``, gpt-oss's sinks ``s_aux``, anything unknown) keep their meaning.

Two names are registered: ``sftune_varlen`` (outside packed rows it is transformers' SDPA) and
``sftune_varlen_eager`` (outside packed rows it is the family's eager attention, for models that do
not support SDPA, such as Gemma 2 and gpt-oss). While a flat row runs (:func:`flat_rows`), the mask
functions return no mask at all, so no ``[T, T]`` mask is ever built for it. The start-up probe
(``sftune.probe``) checks the result against the model run one example at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

NAME = "sftune_varlen"
NAME_EAGER = "sftune_varlen_eager"
NAMES = (NAME, NAME_EAGER)
_registered = False
_flat = contextvars.ContextVar("sftune_flat_rows", default=False)
BACKEND_ATTR = "sftune_attention_backend"
"""The attribute, on every module of a model, naming the kernel inside its flat rows
(:mod:`sftune.backends`: loop, flex or flash); unset: loop. It belongs to the model the probe chose
it for, so several models in one process (the dashboard, ``eval --baseline``) keep their own."""

# keyword arguments that attention layers pass and that do not change what one example attends to
_NEUTRAL = {"position_ids", "output_attentions", "use_cache", "cache_position", "is_causal", "cu_seq_lens_q",
            "cu_seq_lens_k", "max_length_q", "max_length_k", "layer_idx", "past_key_values", "cache",
            "position_embeddings", "target_dtype", "sliding_window", "doc_bounds"}


class BoundsLost(RuntimeError):
    """A flat row reached attention without ``doc_bounds``: the model's layers do not pass extra
    keyword arguments on to attention (StableLM, for example), so it cannot use the flat layout.
    Also raised when a flat row reaches attention with a mask the layer built itself (Doge adds a
    learned bias to the mask): per-example attention would drop it."""


@contextlib.contextmanager
def flat_rows():
    """Within this context the model runs one flat row with ``doc_bounds``: masks are not built
    (every attention call builds its own per-example mask)."""
    token = _flat.set(True)
    try:
        yield
    finally:
        _flat.reset(token)


def set_backend(model, name: str) -> None:
    """The kernel that runs ``model``'s flat-row attention (see :func:`sftune.backends.choose_attention`):
    recorded on each of its modules, where its attention layers read it."""
    from sftune.backends import BACKENDS

    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}")
    for module in model.modules():
        setattr(module, BACKEND_ATTR, name)  # a plain attribute: not a parameter, not in the state dict


def get_backend(model) -> str:
    """The kernel of ``model``'s flat rows (``loop`` unless :func:`set_backend` chose another); a
    wrapper (peft, the loss model) answers for the model inside it."""
    return next((getattr(m, BACKEND_ATTR) for m in model.modules() if hasattr(m, BACKEND_ATTR)), "loop")


def family_eager(module):
    """The model family's own ``eager_attention_forward`` (every transformers modeling file defines
    one, with the family's details: softcap, sinks, ...), or transformers' generic one."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def example_mask(length: int, window: int | None, device) -> torch.Tensor:
    """``[length, length]`` bool: key ``k`` is visible to query ``q`` (causal, within the window)."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    keep = k <= q
    if window is not None:
        keep &= k > q - window
    return keep


def _one_example(module, q, k, v, dropout, scaling, window, eager, extra):
    """Attention of one example (``[1, heads, L, d]``) -> ``[1, L, heads, d]``."""
    length = q.shape[2]
    if eager:
        keep = example_mask(length, window, q.device)
        mask = torch.zeros((1, 1, length, length), dtype=q.dtype, device=q.device)
        mask.masked_fill_(~keep, torch.finfo(q.dtype).min)
        out, _ = family_eager(module)(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                      sliding_window=window, **extra)
        return out
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: one key/value head serves several query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if window is None or window >= length:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=example_mask(length, window, q.device),
                                             dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, doc_bounds: tuple[int, ...] | None = None,
                             sliding_window: int | None = None, *, _eager: bool = False, **kwargs):
    """``doc_bounds`` (cumulative example offsets of a single flat row) selects per-example
    attention; without it this is transformers' SDPA (or the family's eager) attention."""
    if doc_bounds is None and _flat.get():
        raise BoundsLost(f"{type(module).__name__} did not pass the example boundaries on to attention, so this "
                         "model cannot train in one flat row; set model.check=auto (it picks another layout)")
    if doc_bounds is not None and _flat.get() and attention_mask is not None:
        raise BoundsLost(f"{type(module).__name__} builds its own attention mask or bias, which per-example "
                         "attention would drop, so this model cannot train in one flat row; set model.check=auto "
                         "(it picks another layout)")
    if doc_bounds is None or query.shape[0] != 1:
        if _eager:
            return family_eager(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        sliding_window=sliding_window, **kwargs)

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # softcap, sinks or anything else the family reads: run the family's own eager attention
    special = {k: v for k, v in kwargs.items() if v is not None and k not in _NEUTRAL}
    backend = getattr(module, BACKEND_ATTR, "loop")
    if backend != "loop":
        from sftune import backends

        out = backends.run(backend, module, query, key, value, doc_bounds, dropout, scaling, sliding_window, special)
        if out is not None:
            return out, None
    eager = _eager or bool(special) or getattr(module, "sinks", None) is not None
    outputs = [_one_example(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout, scaling,
                            sliding_window, eager, special)
               for s, e in zip(doc_bounds[:-1], doc_bounds[1:])]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return out.contiguous(), None


def _mask_function(base):
    def mask(*args, **kwargs):
        return None if _flat.get() else base(*args, **kwargs)

    return mask


def register() -> None:
    global _registered
    if _registered:
        return

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionInterface.register(NAME_EAGER, functools.partial(varlen_attention_forward, _eager=True))
    AttentionMaskInterface.register(NAME, _mask_function(sdpa_mask))
    AttentionMaskInterface.register(NAME_EAGER, _mask_function(eager_mask))
    _registered = True


def enable_varlen(model) -> bool:
    """Switch a model using SDPA (the transformers default) or eager attention to per-example
    attention for flat rows. Returns whether the model now takes ``doc_bounds``."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl in NAMES:
        return True
    if impl not in ("sdpa", "eager", None) or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    name = NAME_EAGER if impl == "eager" else NAME
    vision = getattr(config, "vision_config", None)
    try:  # an image-text-to-text model: its vision tower keeps its own attention
        model.set_attn_implementation(name if vision is None else {
            "": name, "text_config": name, "vision_config": getattr(vision, "_attn_implementation", None) or "sdpa"})
    except (ValueError, ImportError, AttributeError):
        return False
    return getattr(model.config, "_attn_implementation", None) == name


def disable_varlen(model) -> None:
    """Undo :func:`enable_varlen`: back to the SDPA or eager attention it replaced."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in NAMES:
        model.set_attn_implementation("eager" if impl == NAME_EAGER else "sdpa")
