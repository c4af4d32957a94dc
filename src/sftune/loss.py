"""The loss: summed cross-entropy over loss positions only, with a chunked, fused lm_head.

``CausalLMWithLoss`` wraps a causal LM (plain or peft). Its forward runs the transformer body,
gathers the hidden states at the positions that carry a target, and computes
``sum(cross_entropy)`` over them with :class:`ChunkedLinearCrossEntropy`: the vocabulary
projection and the loss run chunk by chunk, and the gradients for the hidden states and the head
weight are produced in the same pass. ``[tokens, vocab]`` logits are never materialised and
nothing is recomputed in the backward pass.

The forward returns the *sum*; the training loop divides by the number of loss tokens of the
whole optimizer step (see ``train.py``), so gradient accumulation and data parallelism give the
same gradients as one big batch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sftune.attention import NAMES, flat_rows
from sftune.capabilities import body_of, logit_transforms
from sftune.model import unwrap_causal_lm

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk


class _DropPaddingWarning(logging.Filter):
    """transformers warns about padded inputs without an attention mask. Our batches are padded on
    the right with no loss there (harmless under a causal mask) or packed with restarting
    ``position_ids`` (per-example masks are derived from them), so the warning does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_DropPaddingWarning())


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T + bias, target_i)`` computed in row chunks.

    Forward computes the loss and, when gradients are needed, the gradients with respect to
    ``hidden``, ``weight`` and ``bias`` for an upstream gradient of 1; backward scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, row_weights=None):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        n = hidden.shape[0]
        acc = torch.promote_types(torch.float32, hidden.dtype)  # fp32 for fp32/bf16/fp16 models
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, n, chunk_rows):
            h = hidden[s:s + chunk_rows]
            t = targets[s:s + chunk_rows]
            rw = None if row_weights is None else row_weights[s:s + chunk_rows].to(acc)
            logits = F.linear(h, weight, bias).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            row_loss = lse - logits.gather(1, t[:, None]).squeeze(1)
            loss += (row_loss if rw is None else row_loss * rw).sum()
            if need_h or need_w or need_b:
                # d(sum w * CE)/d(logits) = w * (softmax - onehot), computed in place
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1.0
                if rw is not None:
                    g.mul_(rw[:, None])
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(hidden.dtype)
                if need_h:
                    torch.matmul(g, weight.to(g.dtype), out=grad_h[s:s + chunk_rows])
                if need_w:  # accumulate the weight gradient in fp32 (or fp64)
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.has
        gh = next(saved) * grad_out if need_h else None
        gw = (next(saved) * grad_out).to(ctx.weight_dtype) if need_w else None
        gb = (next(saved) * grad_out).to(ctx.weight_dtype) if need_b else None
        return gh, gw, gb, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                             row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, chunked; each
    row's loss times ``row_weights`` when given."""
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps every parameter in the graph (DDP)
        return zero.float()
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows or _chunk_rows(weight.shape[0]),
                                           row_weights)


def reference_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain summed cross-entropy over targets != -100 (the reference the fused loss must match)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


class CausalLMWithLoss(nn.Module):
    """A causal LM whose forward returns the summed token loss of a batch.

    Inputs come from :func:`sftune.data.packing.collate` (plus ``loss_index``/``loss_targets``):
    ``position_ids`` restart at every packed example and no 2-D attention mask is passed.
    """

    def __init__(self, model: nn.Module, fused: bool = True, layout: str | None = None):
        super().__init__()
        self.model = model
        lm = self.causal_lm
        special = logit_transforms(getattr(lm, "config", None))  # softcaps, scales, multipliers after lm_head
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        self.fused = fused and not special and isinstance(head, nn.Linear) and body_of(lm) is not None
        self.layout = layout
        """The row layout the batches use (``sftune.capabilities.LAYOUTS``); None: flat when ``varlen``."""

    @property
    def _no_split_modules(self):
        """The transformer block classes, for FSDP's transformer-layer auto wrap."""
        return getattr(self.causal_lm, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Re-tie input and output embeddings. accelerate's FSDP2 preparation with
        ``fsdp_cpu_ram_efficient_loading`` moves the model to the meta device, which unties shared
        parameters, and calls ``tie_weights`` on the model it prepares (this wrapper) to restore
        them; without it a tied head would train as a separate copy."""
        tie = getattr(self.causal_lm, "tie_weights", None)
        return tie(*args, **kwargs) if callable(tie) else None

    @property
    def causal_lm(self) -> nn.Module:
        return unwrap_causal_lm(self.model)

    @property
    def varlen(self) -> bool:
        """Whether the model attends per example within a flat row (see ``sftune.attention``)."""
        return getattr(self.causal_lm.config, "_attn_implementation", None) in NAMES

    def _call(self, fn, input_ids, position_ids, doc_bounds, model_inputs=None):
        kw = dict(model_inputs or {})  # the examples' extras (sftune.data.extras); may replace position_ids
        kw.setdefault("position_ids", position_ids)
        if doc_bounds is not None and self.varlen:
            # per-example attention from the boundaries; no mask is built (all-ones tells
            # transformers not to derive the [T, T] block mask from the restarting positions)
            with flat_rows():
                return fn(input_ids=input_ids, use_cache=False, doc_bounds=doc_bounds,
                          attention_mask=torch.ones_like(input_ids), **kw)
        return fn(input_ids=input_ids, use_cache=False, **kw)

    def hidden_states(self, input_ids, position_ids, doc_bounds=None, model_inputs=None) -> torch.Tensor:
        """The body's last hidden states ``[rows, T, hidden]`` (what the fused loss reads); the logits
        for a model whose body cannot be found (:func:`sftune.capabilities.body_of`; the loss is then
        unfused), which are as much a per-token function of the input for the probe."""
        body = body_of(self.causal_lm)
        if body is None:
            return self.logits(input_ids, position_ids, doc_bounds, model_inputs)
        return self._call(body, input_ids, position_ids, doc_bounds, model_inputs).last_hidden_state

    def logits(self, input_ids, position_ids, doc_bounds=None, model_inputs=None) -> torch.Tensor:
        """The model's logits ``[rows, T, vocab]``, with every transform the model applies."""
        return self._call(self.causal_lm, input_ids, position_ids, doc_bounds, model_inputs).logits

    def forward(self, input_ids, position_ids, loss_index, loss_targets, doc_bounds=None, loss_weights=None,
                model_inputs=None):
        """The summed (``loss_weights``: weighted) token loss of the batch; ``model_inputs``: the
        batch's further model arguments (:attr:`sftune.data.packing.Batch.model_inputs`)."""
        lm = self.causal_lm
        if self.fused:
            hidden = self.hidden_states(input_ids, position_ids, doc_bounds, model_inputs)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
            head = lm.get_output_embeddings()
            return linear_cross_entropy_sum(hidden, head.weight, loss_targets, head.bias, row_weights=loss_weights)
        logits = self.logits(input_ids, position_ids, doc_bounds, model_inputs)
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, loss_index)
        if loss_weights is not None:
            return (F.cross_entropy(logits.float(), loss_targets, reduction="none") * loss_weights.float()).sum()
        return F.cross_entropy(logits.float(), loss_targets, reduction="sum")
