"""Per-example attention in one flat row (``sftune.attention``): packed == unpacked loss, logits and
gradients, against SDPA, eager and the plain model run one example at a time. The same property over
many model families (windows, softcaps, sinks, hybrids) is in test_model_families.py."""

import pytest
import torch

from sftune.data.packing import collate


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sftune_varlen"])
def test_packed_loss_equals_unpacked(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    from sftune.attention import enable_varlen
    from sftune.loss import CausalLMWithLoss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation="eager" if attn == "eager"
                                                 else "sdpa", dtype=torch.float32)
    if attn == "sftune_varlen":
        assert enable_varlen(model)
    lm = CausalLMWithLoss(model).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (7, 12, 3, 20):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]
        examples.append((ids, labels))

    def loss(rows):
        b = collate(rows, pad_id=0)
        return lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, b.doc_bounds), b.n_loss

    with torch.no_grad():
        one_by_one = [loss([[e]]) for e in examples]
        packed_sum, packed_n = loss([examples])  # all four in one row
        two_rows_sum, _ = loss([examples[:2], examples[2:]])
        padded_sum, _ = loss([[e] for e in examples])  # unpacked, right-padded batch
    total = sum(s for s, _ in one_by_one)
    assert packed_n == sum(n for _, n in one_by_one)
    torch.testing.assert_close(packed_sum, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_rows_sum, total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_sum, total, rtol=1e-5, atol=1e-5)


def test_varlen_attention_gradients_match_per_example(tiny_model_dir):
    """Per-example attention in one flat row: loss and every parameter gradient equal the sum over
    the examples run one at a time."""
    from transformers import AutoModelForCausalLM

    from sftune.attention import enable_varlen
    from sftune.loss import CausalLMWithLoss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    assert enable_varlen(model)
    lm = CausalLMWithLoss(model)
    examples = [(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (9, 4, 15)]
    flat = collate([examples], pad_id=0)
    assert flat.doc_bounds == (0, 9, 13, 28)
    lm(flat.input_ids, flat.position_ids, flat.loss_index, flat.loss_targets, flat.doc_bounds).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for e in examples:
        b = collate([[e]], pad_id=0)
        lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_packed_per_example_logits_match(tiny_model_dir):
    """Stronger than the summed loss: every position's logits match the example run alone.

    ``use_cache=False`` matters: with a KV cache, transformers does not derive per-example masks
    from ``position_ids`` (CausalLMWithLoss always passes it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    a, b = list(range(5, 15)), list(range(20, 26))
    with torch.no_grad():
        la = model(torch.tensor([a])).logits[0]
        lb = model(torch.tensor([b])).logits[0]
        packed = model(torch.tensor([a + b]), position_ids=torch.tensor([list(range(10)) + list(range(6))]),
                       use_cache=False).logits[0]
    torch.testing.assert_close(packed[:10], la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[10:], lb, rtol=1e-5, atol=1e-5)


def test_the_backend_belongs_to_its_model(tiny_model_dir):
    """Two models in one process (the dashboard, eval --baseline) keep their own flat-row kernel;
    a wrapper answers for the model inside it."""
    from transformers import AutoModelForCausalLM

    from sftune import attention
    from sftune.loss import CausalLMWithLoss

    a = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    b = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    attention.set_backend(a, "flex")
    assert attention.get_backend(a) == "flex" and attention.get_backend(b) == "loop"
    assert attention.get_backend(CausalLMWithLoss(a)) == "flex"
    assert all(getattr(m, attention.BACKEND_ATTR) == "flex" for m in a.modules())
    assert not any(attention.BACKEND_ATTR in k for k in a.state_dict())
