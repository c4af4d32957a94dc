"""The distillation loss: a divergence to the teacher's distribution, chunked like the cross-entropy.

At each loss position the student's logits ``z = hidden @ W.T (+ b)`` and the teacher's logits
``t`` (live: the teacher's hidden states times its head, chunk by chunk) or its top-k token ids and
log-probabilities (saved) give, at temperature ``T``, the teacher's distribution p and the
student's q over a set of *categories*:

* the full vocabulary (``top_k=None``): p = softmax(t / T), q = softmax(z / T);
* the teacher's k most likely tokens, ``renormalise``: both restricted to those k and renormalised
  over them (a constant shift of the teacher's logits changes nothing, so saved log-probabilities
  give the same p as logits at any T);
* ``bucket``: those k tokens plus one category for the rest of the vocabulary, holding each
  model's remaining mass (1 - its mass on the k).

The divergences, with TRL's (GKD's) definitions: ``forward_kl`` KL(p || q), ``reverse_kl``
KL(q || p), ``jsd`` beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q
(beta 0 and 1 are the two KLs exactly). The token loss is ``alpha * divergence + (1 - alpha) * CE``
(CE at temperature 1 on the data's token), times the position's weight, summed: the training loop
divides the sum by the step's loss weight, so accumulation and ranks give the same gradients.

:class:`ChunkedDistillation` runs this over row chunks: one chunk's ``[rows, vocab]`` logits of
each model exist at a time, never ``[tokens, vocab]``. In each chunk the gradient of the chunk's
loss with respect to the student's logits is taken at once and turned into the gradients of the
hidden states, the head's weight and bias, as the fused cross-entropy does (:mod:`sftune.loss`):
one pass, nothing kept for backward but those gradients, nothing recomputed. That gradient is in
closed form where the categories are a softmax over vocabulary entries (full vocabulary, renormalised
top-k: :func:`closed_form`), and autograd over the chunk's few element-wise ops on a detached leaf
otherwise (the ``bucket`` tail); the tests hold both to a float64 reference and its autograd gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sftune.loss import CHUNK_BYTES

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
FLOOR = -1e4
"""Log-probabilities are clamped here: exp(FLOOR) is 0 in every float type, so a category with no
mass contributes 0 (never 0 * inf = nan) and its gradient stays finite."""


@dataclass(frozen=True)
class Spec:
    """What to compute: the divergence, its parameters and the categories."""

    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 1.0
    top_k: int | None = None
    tail: str = "renormalise"
    exact_grad: str = "closed"
    """``closed``: the gradient in closed form where it exists (:func:`closed_form`), else autograd over
    the chunk; ``autograd``: always autograd (the tests compare the two)."""

    @classmethod
    def of(cls, cfg) -> "Spec":
        """From the config's ``distill`` section."""
        return cls(cfg.loss, cfg.beta, cfg.temperature, cfg.alpha, cfg.top_k, cfg.top_k_tail)


def kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities over the last dimension (0 where a has no mass)."""
    return (loga.exp() * (loga - logb)).sum(-1)


def divergence(logp: torch.Tensor, logq: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-row divergence of the teacher's ``logp`` and the student's ``logq`` (same categories)."""
    logp, logq = logp.clamp(min=FLOOR), logq.clamp(min=FLOOR)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return kl(logp, logq)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return kl(logq, logp)
    if loss != "jsd":
        raise ValueError(f"unknown divergence {loss!r}; one of {', '.join(DIVERGENCES)}")
    m = torch.logaddexp(logq + math.log1p(-beta), logp + math.log(beta))
    return beta * kl(logp, m) + (1 - beta) * kl(logq, m)


@dataclass
class TeacherChunk:
    """The teacher at a chunk's rows: full ``logits`` [r, V] (live) or top-k ``ids``/``logprobs``
    [r, k] (saved: log-probabilities at temperature 1; ``valid`` marks real entries), and the
    teacher's own cross-entropy on the data's token when known (``ce`` [r])."""

    logits: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    ce: torch.Tensor | None = None


def _without(x: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``x`` [r, V] with the entries at ``ids`` [r, k] (the valid ones) set to -inf (out of place)."""
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    if valid is not None:
        rows, ids = rows[valid], ids[valid]
    return x.index_put((rows.reshape(-1), ids.reshape(-1)), torch.tensor(float("-inf"), dtype=x.dtype,
                                                                         device=x.device))


def categories(z: torch.Tensor, teacher: TeacherChunk, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, logq)`` [r, C]: the teacher's and the student's log-probabilities over the
    categories of ``spec`` (see the module docstring); ``z`` is the student's logits [r, V]."""
    T, vocab = spec.temperature, z.shape[-1]
    zs = z / T
    if teacher.logits is not None:
        ts = teacher.logits.to(z.dtype) / T
        if spec.top_k is None or spec.top_k >= vocab:
            return F.log_softmax(ts, -1), F.log_softmax(zs, -1)
        ids, valid = ts.topk(spec.top_k, dim=-1, sorted=False).indices, None
        tk = ts.gather(1, ids)
        full_t = torch.logsumexp(ts, -1, keepdim=True)
    else:
        ids, valid = teacher.ids, teacher.valid
        if spec.top_k is not None and spec.top_k < ids.shape[1]:  # the saved rows are sorted, most likely first
            ids, valid = ids[:, :spec.top_k], None if valid is None else valid[:, :spec.top_k]
        tk = teacher.logprobs[:, :ids.shape[1]].to(z.dtype) / T
        full_t = None
    neg = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    zk = zs.gather(1, ids)
    if valid is not None:
        tk, zk = torch.where(valid, tk, neg), torch.where(valid, zk, neg)
    if spec.tail == "renormalise" or ids.shape[1] >= vocab:
        return F.log_softmax(tk, -1), F.log_softmax(zk, -1)
    # bucket: the k tokens' log-probabilities under the full softmax, and the rest as one category
    lse_z = torch.logsumexp(zs, -1, keepdim=True)
    q_tail = torch.logsumexp(_without(zs, ids, valid), -1, keepdim=True) - lse_z
    if full_t is not None:
        p_tail = torch.logsumexp(_without(ts, ids, valid), -1, keepdim=True) - full_t
        pk = tk - full_t
    else:
        if T != 1.0:
            raise ValueError("top_k_tail=bucket on saved log-probabilities needs temperature 1")
        pk = tk
        mass = torch.logsumexp(pk, -1, keepdim=True)
        p_tail = torch.log((-torch.expm1(mass)).clamp(min=0))
    return torch.cat([pk, p_tail], -1), torch.cat([zk - lse_z, q_tail], -1)


def token_losses(z: torch.Tensor, targets: torch.Tensor, teacher: TeacherChunk, spec: Spec):
    """Per row: ``(divergence, cross-entropy)`` of the student's logits ``z`` [r, V]."""
    logp, logq = categories(z, teacher, spec)
    div = divergence(logp, logq, spec.loss, spec.beta)
    ce = torch.logsumexp(z, -1) - z.gather(1, targets[:, None]).squeeze(1)
    return div, ce


def closed_form(z: torch.Tensor, targets: torch.Tensor, teacher: TeacherChunk, spec: Spec, need: bool):
    """``(divergence, cross-entropy, d(alpha * D + (1 - alpha) * CE)/dz)`` per row, with the gradient in
    closed form, for categories that are a softmax over vocabulary entries (the full vocabulary, or
    the top k renormalised); ``None`` for the ``bucket`` tail (computed by :func:`token_losses`).

    With q = softmax(z_S / T) over the categories S and g = dD/dq up to a constant per row, the
    gradient is q * (g - <q, g>) / T on S: forward KL gives q - p, reverse KL g = log q - log p, the
    JSD g = (1 - beta) * (log q - log m). Fewer [rows, vocab] temporaries and passes than autograd;
    the tests hold both to the float64 reference."""
    vocab, T = z.shape[-1], spec.temperature
    ids = valid = None
    if teacher.logits is not None:
        ts = teacher.logits.to(z.dtype) / T
        if spec.top_k is not None and spec.top_k < vocab:
            ids = ts.topk(spec.top_k, dim=-1, sorted=False).indices
            ts = ts.gather(1, ids)
    else:
        ids, valid = teacher.ids, teacher.valid
        if spec.top_k is not None and spec.top_k < ids.shape[1]:
            ids, valid = ids[:, :spec.top_k], None if valid is None else valid[:, :spec.top_k]
        ts = teacher.logprobs[:, :ids.shape[1]].to(z.dtype) / T
    if ids is not None and ids.shape[1] < vocab and spec.tail == "bucket":
        return None
    zs = z / T if ids is None else z.gather(1, ids) / T
    if valid is not None:
        neg = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
        ts, zs = torch.where(valid, ts, neg), torch.where(valid, zs, neg)
    logp = F.log_softmax(ts, -1).clamp_(min=FLOOR)
    logq = F.log_softmax(zs, -1).clamp_(min=FLOOR)
    div = divergence(logp, logq, spec.loss, spec.beta)
    lse = torch.logsumexp(z, -1)
    ce = lse - z.gather(1, targets[:, None]).squeeze(1)
    if not need:
        return div, ce, None
    q = logq.exp()
    beta = spec.beta if spec.loss == "jsd" else (0.0 if spec.loss == "forward_kl" else 1.0)
    if beta == 0:  # forward KL
        gs = q - logp.exp()
    else:
        if beta == 1:
            gq = logq - logp
        else:
            gq = (1 - beta) * (logq - torch.logaddexp(logq + math.log1p(-beta), logp + math.log(beta)))
        gs = q * (gq - (q * gq).sum(-1, keepdim=True))
    gs.mul_(spec.alpha / T)
    if spec.alpha < 1:  # d CE / dz = softmax(z) - onehot(target)
        g = (z - lse[:, None]).exp_().mul_(1 - spec.alpha)
        g[torch.arange(len(targets), device=z.device), targets] -= 1 - spec.alpha
    else:
        g = torch.zeros_like(z)
    if ids is None:
        g += gs
    else:
        g.scatter_add_(1, ids, gs)
    return div, ce, g


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: a few [rows, vocab] fp32 tensors of each model live at once."""
    return max(16, CHUNK_BYTES // (4 * vocab * 4))


class ChunkedDistillation(torch.autograd.Function):
    """``sum_i w_i * (alpha * D_i + (1 - alpha) * CE_i)`` over row chunks, with the gradients for
    ``hidden``, ``weight`` and ``bias`` produced in the forward pass (see the module docstring).

    ``teacher(s, e)`` returns the :class:`TeacherChunk` of rows ``s:e``. Returns the loss and,
    not differentiable, ``[sum w * D, sum w * CE, sum w * teacher CE, sum w over rows where the
    teacher's CE is known]`` for the logs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, row_weights, teacher, spec, rows_per_chunk):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        need = need_h or need_w or need_b
        n = hidden.shape[0]
        acc = torch.promote_types(torch.float32, hidden.dtype)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        stats = torch.zeros(4, dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for s in range(0, n, rows_per_chunk):
            e = min(n, s + rows_per_chunk)
            h = hidden[s:e]
            z = F.linear(h, weight, bias).to(acc).detach()
            t_chunk = teacher(s, e)
            rw = None if row_weights is None else row_weights[s:e].to(acc)
            with torch.autocast(hidden.device.type, enabled=False):
                done = closed_form(z, targets[s:e], t_chunk, spec, need) if spec.exact_grad == "closed" else None
            if done is not None:
                div, ce, g = done
                rows = spec.alpha * div + (1 - spec.alpha) * ce if spec.alpha < 1 else div
                total = (rows if rw is None else rows * rw).sum()
                if g is not None and rw is not None:
                    g.mul_(rw[:, None])
            else:
                with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
                    z.requires_grad_(need)
                    div, ce = token_losses(z, targets[s:e], t_chunk, spec)
                    rows = spec.alpha * div + (1 - spec.alpha) * ce if spec.alpha < 1 else div
                    if rw is not None:
                        rows = rows * rw
                    total = rows.sum()
                    g = torch.autograd.grad(total, z)[0] if need else None
                div, ce = div.detach(), ce.detach()
            w = torch.ones_like(div) if rw is None else rw
            loss += total.detach()
            stats[0] += (div * w).sum()
            stats[1] += (ce * w).sum()
            if t_chunk.ce is not None:
                known = torch.isfinite(t_chunk.ce)
                stats[2] += torch.where(known, t_chunk.ce.to(acc) * w, 0).sum()
                stats[3] += torch.where(known, w, 0).sum()
            if need:
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(hidden.dtype)
                if need_h:
                    torch.matmul(g, weight.to(g.dtype), out=grad_h[s:e])
                if need_w:
                    grad_w.addmm_(g.t().to(acc), h.to(acc))
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.has
        gh = next(saved) * grad_out if need_h else None
        gw = (next(saved) * grad_out).to(ctx.weight_dtype) if need_w else None
        gb = (next(saved) * grad_out).to(ctx.weight_dtype) if need_b else None
        return gh, gw, gb, None, None, None, None, None


def distill_loss_sum(hidden, weight, bias, targets, teacher, spec: Spec, row_weights=None,
                     rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed distillation loss of the student's ``hidden`` [n, H] at loss positions and its
    head (``weight`` [V, H], ``bias``), against ``teacher(s, e)`` chunks; ``(loss, stats)``."""
    if hidden.shape[0] == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps every parameter in the graph (DDP)
        return zero.float(), torch.zeros(4, dtype=torch.float32, device=hidden.device)
    return ChunkedDistillation.apply(hidden, weight, bias, targets, row_weights, teacher, spec,
                                     rows_per_chunk or chunk_rows(weight.shape[0]))
