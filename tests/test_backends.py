"""The attention kernel per device (sftune.backends): the choice, and each kernel's equivalence with
the plain model run one example at a time, wherever the kernel runs.

* ``loop`` (the CPU path) is covered by tests/test_model_families.py.
* ``flex``: torch 2.13 runs FlexAttention on CPU forward only (no backward), so here its masks
  (document, window, softcap) are checked in no-grad mode on tiny families; forward + backward
  on CUDA in ``test_flex_trains_exact_on_cuda``.
* ``flash``: CUDA with flash_attn only (``test_flash_matches_on_cuda``).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from sftune import attention
from sftune.backends import attention_line, choose_attention
from sftune.capabilities import capabilities
from sftune.data.packing import collate
from sftune.loss import CausalLMWithLoss
from test_model_families import build, examples, max_logit_diff, reference

CUDA = torch.cuda.is_available()
FLASH = CUDA and importlib.util.find_spec("flash_attn") is not None


@pytest.fixture
def backend():
    yield attention.set_backend


def flat_logits(model, exs, device="cpu", grad=False):
    assert attention.enable_varlen(model)
    lm = CausalLMWithLoss(model, fused=False, layout="flat")
    b = collate([list(exs)], pad_id=0)
    b = b.to(device)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns that it runs uncompiled on CPU
        out = lm.logits(b.input_ids, b.position_ids, b.doc_bounds)
    per, pos = [], 0
    for ids, _ in exs:
        per.append(out[0, pos:pos + len(ids)])
        pos += len(ids)
    return per, lm, b


def test_choice_per_device(monkeypatch):
    monkeypatch.delenv("SFTUNE_ATTENTION", raising=False)
    assert choose_attention("cpu")[0] == "loop"
    monkeypatch.setattr("sftune.backends.flash_available", lambda: True)
    assert choose_attention(torch.device("cuda", 0))[0] == "flash"
    monkeypatch.setattr("sftune.backends.flash_available", lambda: False)
    assert choose_attention("cuda")[0] == "flex"
    gpt_oss = capabilities(build("gpt_oss"))  # attention sinks: the family's own eager attention
    assert choose_attention("cuda", gpt_oss)[0] == "loop"
    monkeypatch.setenv("SFTUNE_ATTENTION", "flex")
    assert choose_attention("cpu") == ("flex", "SFTUNE_ATTENTION")
    assert attention_line("flex", "x").startswith("attention: flex")


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_flex_matches_the_model_on_cpu(name, backend):
    """FlexAttention's document mask (+ window for mistral, + window and softcap for gemma2) gives
    the plain model's per-example logits (forward: what torch runs on CPU)."""
    model = build(name)
    exs = examples()
    ref, _, _ = reference(model, exs)
    backend(model, "loop")
    loop, _, _ = flat_logits(model, exs)
    backend(model, "flex")
    flex, _, _ = flat_logits(model, exs)
    assert max_logit_diff(loop, ref) < 2e-4
    assert max_logit_diff(flex, ref) < 2e-4, (name, max_logit_diff(flex, ref))


def test_flex_is_not_the_loop_by_accident(backend, monkeypatch):
    """The flex kernel really runs (a broken document mask shows)."""
    from sftune import backends

    calls = []
    real = backends.flex_forward
    monkeypatch.setattr(backends, "flex_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build("llama")
    backend(model, "flex")
    flat_logits(model, examples())
    assert len(calls) == model.config.num_hidden_layers


def test_probe_uses_and_reports_the_backend(backend, monkeypatch):
    from test_model_families import probe

    monkeypatch.setenv("SFTUNE_ATTENTION", "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build("mistral")
        choice = probe(model)
    assert choice.layout == "flat" and choice.record["attention"] == "flex"
    assert attention.get_backend(model) == "flex"
    other = build("llama")  # another model in the same process keeps its own kernel
    assert attention.get_backend(other) == "loop"


def _grads_match(name, kernel):
    model = build(name).cuda()
    exs = examples()
    ref_logits, ref_loss, ref_grads = reference(model, exs)
    attention.set_backend(model, kernel)
    model.train()
    logits, lm, b = flat_logits(model, exs, "cuda", grad=True)
    loss = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds)
    loss.backward()
    return max_logit_diff([x.detach() for x in logits], ref_logits), float(loss), float(ref_loss), model, ref_grads


@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward runs on CUDA only (torch 2.13 has none on CPU)")
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_flex_trains_exact_on_cuda(name, backend):
    diff, loss, ref_loss, model, ref_grads = _grads_match(name, "flex")
    assert diff < 2e-3 and loss == pytest.approx(ref_loss, rel=1e-4)
    for n, p in model.named_parameters():
        if n in ref_grads:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not FLASH, reason="flash-attention needs CUDA and the flash_attn package")
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_flash_matches_on_cuda(name, backend):
    diff, loss, ref_loss, _, _ = _grads_match(name, "flash")  # bf16 inside the kernel
    assert diff < 5e-2 * 20 and loss == pytest.approx(ref_loss, rel=2e-2)


@pytest.mark.parametrize("fault", ["differs", "fails"])
def test_probe_falls_back_to_the_loop_when_the_kernel_is_wrong(fault, backend, monkeypatch):
    from sftune import backends
    from test_model_families import probe

    def broken(module, q, k, v, bounds, *a, **kw):
        if fault == "fails":
            raise RuntimeError("no kernel for this device")
        return torch.zeros_like(q).transpose(1, 2)

    monkeypatch.setenv("SFTUNE_ATTENTION", "flex")
    monkeypatch.setattr(backends, "flex_forward", broken)
    model = build("llama")
    choice = probe(model)
    assert choice.layout == "flat" and choice.record["attention"] == "loop"
    assert attention.get_backend(model) == "loop" and choice.record["attention_diff"]


def test_flex_rows_are_bucketed(backend):
    from sftune.config import Config
    from sftune.speedups import bucket_for

    model = build("llama")
    backend(model, "flex")
    assert bucket_for(Config(), model) == 128 and bucket_for(Config()) == 0
    backend(model, "loop")
    assert bucket_for(Config(), model) == 0
