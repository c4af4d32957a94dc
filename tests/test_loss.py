"""The chunked, fused lm_head + cross-entropy equals the plain loss, in value and gradients."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sftune.loss import CausalLMWithLoss, linear_cross_entropy_sum


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_matches_reference(chunk, bias):
    torch.manual_seed(0)
    n, d, v = 37, 16, 101
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    fused = linear_cross_entropy_sum(h, w, t, b, chunk_rows=chunk)
    (fused * 0.37).backward()
    grads = [h.grad.clone(), w.grad.clone()] + ([b.grad.clone()] if bias else [])
    for x in [h, w] + ([b] if bias else []):
        x.grad = None
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    (ref * 0.37).backward()
    ref_grads = [h.grad, w.grad] + ([b.grad] if bias else [])
    torch.testing.assert_close(fused.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_fused_loss_fp32_tolerance():
    torch.manual_seed(1)
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(5000, 64, requires_grad=True)
    t = torch.randint(0, 5000, (300,))
    fused = linear_cross_entropy_sum(h, w, t, chunk_rows=64)
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    ref.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)


def test_frozen_head_gets_no_gradient_work():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8)  # frozen (LoRA)
    loss = linear_cross_entropy_sum(h, w, torch.randint(0, 11, (5,)))
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_empty_selection_is_zero_and_differentiable():
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and w.grad is not None


def test_model_loss_matches_hf_loss(tiny_model_dir):
    """CausalLMWithLoss (fused) == the plain per-token loss of the HF model, and gradients agree."""
    from transformers import AutoModelForCausalLM

    from sftune.data.packing import collate

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    fused = CausalLMWithLoss(model)
    plain = CausalLMWithLoss(model, fused=False)
    assert fused.fused and not plain.fused
    rows = [[(list(range(3, 20)), [-100] * 5 + list(range(8, 20)))], [(list(range(40, 49)), list(range(40, 49)))]]
    b = collate(rows, pad_id=0)
    args = (b.input_ids, b.position_ids, b.loss_index, b.loss_targets)
    a = fused(*args)
    a.backward()
    ga = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    r = plain(*args)
    r.backward()
    torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # and against transformers' own (mean) loss on the same labels
    labels = torch.full_like(b.input_ids, -100)
    labels[:, 1:] = b.targets[:, :-1]
    hf = model(input_ids=b.input_ids, labels=labels).loss
    torch.testing.assert_close(a / b.n_loss, hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [3, 1000])
def test_weighted_fused_loss_matches_reference(chunk):
    """Per-token weights (messages' ``weight``): sum(w * CE), gradients included."""
    torch.manual_seed(2)
    n, d, v = 29, 8, 53
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,))
    rw = torch.rand(n, dtype=torch.float64) * 2
    fused = linear_cross_entropy_sum(h, w, t, chunk_rows=chunk, row_weights=rw)
    fused.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = (F.cross_entropy(F.linear(h, w), t, reduction="none") * rw).sum()
    ref.backward()
    torch.testing.assert_close(fused.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("check", ["auto", "off"])
def test_body_found_where_the_prefix_names_another_attribute(check):
    """Llama 4 declares its body as ``language_model`` and stores it as ``model``: ``base_model`` and
    ``get_decoder()`` return the whole causal LM. The loss wrapper still reaches the body's
    ``last_hidden_state``, with the probe (auto) and without it (off), and the fused loss equals
    the unfused one."""
    from sftune.capabilities import body_of
    from sftune.data.packing import collate
    from test_model_families import build, examples, probe

    model = build("llama4")
    assert model.base_model is model and body_of(model) is model.model
    choice = probe(model, check=check)
    assert choice.fused and choice.layout == "flat", choice.line
    lm = CausalLMWithLoss(model, fused=True, layout="flat")
    b = collate([examples()], pad_id=0)
    fused = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds)
    lm.fused = False
    plain = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    assert lm.hidden_states(b.input_ids, b.position_ids).shape == (*b.input_ids.shape, 64)


def test_no_body_means_unfused_and_logits_for_the_probe():
    """A causal LM without a findable body: the loss is unfused, the probe compares logits."""
    from torch import nn

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 7)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(logits=self.head(torch.nn.functional.one_hot(input_ids % 4, 4).float()))

    lm = CausalLMWithLoss(Bare())
    ids = torch.tensor([[1, 2, 3]])
    assert not lm.fused and lm.hidden_states(ids, None).shape == (1, 3, 7)


def test_padding_warning_filter_is_installed_by_the_loss_model_not_at_import(tiny_model_dir):
    import logging
    import subprocess
    import sys

    code = ("import logging, sftune.loss; "
            "print(len(logging.getLogger('transformers.modeling_utils').filters))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "0"
    from transformers import AutoModelForCausalLM

    from sftune.loss import CausalLMWithLoss

    CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    filters = logging.getLogger("transformers.modeling_utils").filters
    assert sum(type(f).__name__ == "_DropPaddingWarning" for f in filters) == 1
