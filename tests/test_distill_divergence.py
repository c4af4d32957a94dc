"""The chunked distillation loss against an independent float64 reference (full logits, probabilities).

The reference builds both models' whole ``[tokens, vocab]`` logits, takes softmaxes, restricts /
buckets in probability space and writes each divergence from its definition (xlogy); the chunked
function works in log space chunk by chunk. Loss and gradients (hidden, weight, bias: autograd of
the reference) must agree to 1e-6.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sftune.distill.divergence import Spec, TeacherChunk, distill_loss_sum

N, V, H = 11, 37, 8


def _kl(a, b):
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def ref_probs(z, t, spec: Spec):
    """(p, q) [n, C] in probability space, from the definitions."""
    p, q = torch.softmax(t / spec.temperature, -1), torch.softmax(z / spec.temperature, -1)
    if spec.top_k is None or spec.top_k >= z.shape[-1]:
        return p, q
    ids = torch.argsort(t, -1, descending=True)[:, :spec.top_k]
    pk, qk = p.gather(1, ids), q.gather(1, ids)
    if spec.tail == "renormalise":
        return pk / pk.sum(-1, keepdim=True), qk / qk.sum(-1, keepdim=True)
    return torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1), torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)


def ref_div(p, q, spec: Spec):
    if spec.loss == "forward_kl" or (spec.loss == "jsd" and spec.beta == 0):
        return _kl(p, q)
    if spec.loss == "reverse_kl" or (spec.loss == "jsd" and spec.beta == 1):
        return _kl(q, p)
    m = spec.beta * p + (1 - spec.beta) * q
    return spec.beta * _kl(p, m) + (1 - spec.beta) * _kl(q, m)


def ref_loss(h, w, b, t, targets, spec: Spec, weights=None):
    z = h @ w.T + b
    p, q = ref_probs(z, t, spec)
    rows = spec.alpha * ref_div(p, q, spec) + (1 - spec.alpha) * F.cross_entropy(z, targets, reduction="none")
    return (rows if weights is None else rows * weights).sum()


def setup_tensors(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / H ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    t = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g, dtype=torch.float64)
    weights[3] = 0.0
    return h, w, b, t, targets, weights


def live(t):
    return lambda s, e: TeacherChunk(logits=t[s:e])


def saved(t, k):
    lp = torch.log_softmax(t, -1)
    top = lp.topk(k, -1)  # sorted, most likely first (as distill-prepare writes)
    return lambda s, e: TeacherChunk(ids=top.indices[s:e], logprobs=top.values[s:e])


def chunked(h, w, b, teacher, targets, spec, weights=None):
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss, stats = distill_loss_sum(h, w, b, targets, teacher, spec, row_weights=weights, rows_per_chunk=4)
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad), stats


def reference(h, w, b, t, targets, spec, weights=None):
    h, w, b = (x.clone().requires_grad_() for x in (h, w, b))
    loss = ref_loss(h, w, b, t, targets, spec, weights)
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad)


CASES = [
    Spec("forward_kl"), Spec("reverse_kl"), Spec("jsd", beta=0.5), Spec("jsd", beta=0.0), Spec("jsd", beta=1.0),
    Spec("jsd", beta=0.2, temperature=2.5), Spec("forward_kl", temperature=0.7, alpha=0.3),
    Spec("reverse_kl", temperature=2.0, alpha=0.6), Spec("forward_kl", top_k=5),
    Spec("reverse_kl", top_k=5, tail="bucket"), Spec("jsd", beta=0.7, top_k=6, tail="bucket", temperature=1.5),
    Spec("jsd", beta=0.4, top_k=4, temperature=3.0, alpha=0.5), Spec("forward_kl", alpha=0.0),
]


@pytest.mark.parametrize("spec", CASES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("grad", ["closed", "autograd"])
def test_matches_the_float64_reference(spec, weighted, grad):
    """Both gradient paths: the closed form (full vocabulary, renormalised top-k) and autograd."""
    spec = dataclasses.replace(spec, exact_grad=grad)
    h, w, b, t, targets, weights = setup_tensors()
    weights = weights if weighted else None
    loss, grads, _ = chunked(h, w, b, live(t), targets, spec, weights)
    ref, ref_grads = reference(h, w, b, t, targets, spec, weights)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("tail", ["renormalise", "bucket"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_of_the_whole_vocabulary_is_the_full_divergence(tail, loss):
    h, w, b, t, targets, _ = setup_tensors(1)
    full, full_g, _ = chunked(h, w, b, live(t), targets, Spec(loss, temperature=1.3))
    for k in (V, V + 5):
        topk, topk_g, _ = chunked(h, w, b, live(t), targets, Spec(loss, temperature=1.3, top_k=k, tail=tail))
        assert topk.item() == pytest.approx(full.item(), rel=1e-12)
    renorm, renorm_g, _ = chunked(h, w, b, saved(t, V), targets, Spec(loss, temperature=1.3, top_k=V))
    assert renorm.item() == pytest.approx(full.item(), rel=1e-10)
    for g, r in zip(renorm_g, full_g):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("spec", [Spec("forward_kl"), Spec("reverse_kl", temperature=2.0), Spec("jsd", beta=0.3),
                                  Spec("jsd", top_k=5, tail="bucket"), Spec("forward_kl", top_k=5)], ids=str)
def test_a_teacher_equal_to_the_student_gives_zero_loss_and_gradient(spec):
    h, w, b, _, targets, weights = setup_tensors(2)
    z = h @ w.T + b
    loss, grads, _ = chunked(h, w, b, live(z), targets, spec, weights)
    assert abs(loss.item()) < 1e-12
    for g in grads:
        assert g.abs().max().item() < 1e-12


@pytest.mark.parametrize("spec", [Spec("forward_kl", top_k=7, temperature=2.0), Spec("jsd", beta=0.6, top_k=7),
                                  Spec("reverse_kl", top_k=7, tail="bucket"),
                                  Spec("jsd", beta=0.3, top_k=7, alpha=0.5, exact_grad="autograd")], ids=str)
def test_saved_top_k_log_probabilities_equal_live_top_k(spec):
    """The saved path (log-probabilities at temperature 1, sorted) gives the live top-k loss."""
    h, w, b, t, targets, weights = setup_tensors(3)
    a, ga, _ = chunked(h, w, b, live(t), targets, spec, weights)
    s, gs, _ = chunked(h, w, b, saved(t, 10), targets, spec, weights)  # saved k=10, used k=7
    assert s.item() == pytest.approx(a.item(), rel=1e-10)
    for x, y in zip(ga, gs):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12)


def test_masked_saved_entries_are_left_out():
    """Entries marked invalid (Axolotl's target_mask, short rows) carry no mass on either side."""
    h, w, b, t, targets, _ = setup_tensors(4)
    spec = Spec("jsd", top_k=6, alpha=0.7)
    top = torch.log_softmax(t, -1).topk(6, -1)
    ids = torch.cat([top.indices[:, :4], torch.zeros(N, 2, dtype=torch.long)], 1)
    lp = torch.cat([top.values[:, :4], torch.full((N, 2), -7.0, dtype=torch.float64)], 1)
    valid = torch.arange(6)[None, :].expand(N, 6) < 4
    masked, gm, _ = chunked(h, w, b, lambda s, e: TeacherChunk(ids=ids[s:e], logprobs=lp[s:e], valid=valid[s:e]),
                            targets, spec)
    four, g4, _ = chunked(h, w, b, saved(t, 4), targets, Spec("jsd", top_k=4, alpha=0.7))
    auto, ga, _ = chunked(h, w, b, lambda s, e: TeacherChunk(ids=ids[s:e], logprobs=lp[s:e], valid=valid[s:e]),
                          targets, dataclasses.replace(spec, exact_grad="autograd"))
    assert auto.item() == pytest.approx(four.item(), rel=1e-12)
    assert all(torch.allclose(x, y) for x, y in zip(ga, g4))
    assert masked.item() == pytest.approx(four.item(), rel=1e-12)
    assert all(torch.allclose(x, y) for x, y in zip(gm, g4))


def test_logged_sums_and_bounded_chunks():
    """stats: [sum w D, sum w CE, sum w teacher CE, weight where the teacher's CE is known]; the result
    does not depend on the chunk size."""
    h, w, b, t, targets, weights = setup_tensors(5)
    spec = Spec("jsd", beta=0.5, alpha=0.4)
    tce = torch.logsumexp(t, -1) - t.gather(1, targets[:, None]).squeeze(1)
    teacher = lambda s, e: TeacherChunk(logits=t[s:e], ce=tce[s:e])  # noqa: E731
    outs = [distill_loss_sum(h, w, b, targets, teacher, spec, weights, rows_per_chunk=r) for r in (1, 4, 64)]
    for loss, stats in outs[1:]:
        assert loss.item() == pytest.approx(outs[0][0].item(), rel=1e-12)
    loss, stats = outs[0]
    z = h @ w.T + b
    div = ref_div(*ref_probs(z, t, spec), spec)
    ce = F.cross_entropy(z, targets, reduction="none")
    assert stats[0].item() == pytest.approx((div * weights).sum().item(), rel=1e-9)
    assert stats[1].item() == pytest.approx((ce * weights).sum().item(), rel=1e-9)
    assert stats[2].item() == pytest.approx((tce * weights).sum().item(), rel=1e-9)
    assert stats[3].item() == pytest.approx(weights.sum().item(), rel=1e-12)
    assert loss.item() == pytest.approx(0.4 * stats[0].item() + 0.6 * stats[1].item(), rel=1e-9)


def test_no_loss_positions_keep_parameters_in_the_graph():
    h, w, b, t, targets, _ = setup_tensors()
    h0 = h[:0].clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss, _ = distill_loss_sum(h0, w, b, targets[:0], live(t[:0]), Spec())
    loss.backward()
    assert loss.item() == 0 and w.grad is not None and w.grad.abs().max() == 0
