"""The live teacher: loading (frozen, dtype, adapters), the vocabulary rule, and the student's batches
seen by the teacher exactly: packed == unpacked == an independent float64 reference built from both
models' full logits, one example at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftune.attention import enable_varlen
from sftune.data.packing import collate
from sftune.distill.divergence import Spec
from sftune.distill.objective import Distiller
from sftune.distill.teacher import load_teacher, teacher_dtype, vocab_map
from sftune.errors import ConfigError
from sftune.loss import CausalLMWithLoss

from conftest import build_model_dir
from test_distill_divergence import ref_div, ref_probs


class FakeTok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_teacher_dtype_auto_is_fp32_on_cpu_and_half_on_gpu(monkeypatch):
    assert teacher_dtype("auto", torch.device("cpu")) == "float32"
    assert teacher_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert teacher_dtype("auto", torch.device("cuda")) == "float16"


def test_vocab_map_same_permuted_and_refused():
    a = FakeTok({"x": 0, "y": 1, "z": 2})
    assert vocab_map(a, FakeTok({"x": 0, "y": 1, "z": 2}), 3, 3) is None
    perm = vocab_map(a, FakeTok({"z": 0, "x": 1, "y": 2}), 3, 3)
    assert perm.tolist() == [1, 2, 0]  # the teacher's id of student ids 0, 1, 2
    with pytest.raises(ConfigError, match="another vocabulary.*'w'"):
        vocab_map(a, FakeTok({"x": 0, "y": 1, "w": 2}), 3, 3)
    with pytest.raises(ConfigError, match="output layer has 5 rows"):
        vocab_map(a, FakeTok({"x": 0, "y": 1, "z": 2}), 3, 5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


def test_loaded_teacher_is_frozen(teacher_dir, tiny_tokenizer):
    t = load_teacher(str(teacher_dir), tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"))
    assert not any(p.requires_grad for p in t.lm.parameters()) and not t.lm.training
    d = t.describe()
    assert d["how"] == "live" and d["dtype"] == "float32" and d["parameters"] > 0


def test_another_head_size_is_refused(tmp_path, tiny_tokenizer):
    wide = build_model_dir(tmp_path / "wide", tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 8)
    with pytest.raises(ConfigError, match="output layer"):
        load_teacher(str(wide), tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"))


EXAMPLES = [([5, 17, 30, 2, 9, 44, 0], [-100, -100, 30, 2, 9, 44, 0]),
            ([7, 8, 9, 10, 11], [-100, 8, 9, 10, 11]),
            ([3, 60, 61, 62, 63, 64, 65, 66, 0], [-100, -100, -100, -100, 63, 64, 65, 66, 0])]


def reference(student_dir, teacher_dir, spec: Spec) -> float:
    """Both plain models, one example at a time, float64, full logits."""
    s = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float64)
    t = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float64)
    total = 0.0
    for ids, labels in EXAMPLES:
        x = torch.tensor([ids])
        with torch.no_grad():
            zs, zt = s(x).logits[0, :-1], t(x).logits[0, :-1]
        keep = torch.tensor(labels[1:]) != -100
        z, tt, tgt = zs[keep], zt[keep], torch.tensor(labels[1:])[keep]
        div = ref_div(*ref_probs(z, tt, spec), spec)
        ce = torch.nn.functional.cross_entropy(z, tgt, reduction="none")
        total += float((spec.alpha * div + (1 - spec.alpha) * ce).sum())
    return total


@pytest.mark.parametrize("spec", [Spec("forward_kl", alpha=0.7, temperature=2.0), Spec("jsd", beta=0.5, top_k=9),
                                  Spec("reverse_kl", top_k=9, tail="bucket")], ids=str)
def test_packed_equals_unpacked_equals_the_reference(spec, tiny_model_dir, teacher_dir, tiny_tokenizer):
    losses, grads = {}, {}
    for layout in ("flat", "rows", "per_example"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
        if layout == "flat":
            assert enable_varlen(model)
        lm = CausalLMWithLoss(model, layout=layout)
        teacher = load_teacher(str(teacher_dir), tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"),
                               "float32", layout)
        teacher.lm.double()
        lm.objective = Distiller(spec, teacher)
        rows = [EXAMPLES] if layout != "per_example" else [[e] for e in EXAMPLES]
        batch = collate(rows, pad_id=0)
        if layout == "rows":
            batch.doc_bounds = None  # boundaries from the restarting position_ids
        loss = lm(**batch.inputs("cpu"))
        loss.backward()
        losses[layout] = loss.item()
        grads[layout] = torch.cat([p.grad.flatten() for p in model.parameters()])
    ref = reference(tiny_model_dir, teacher_dir, spec)
    for layout, value in losses.items():
        assert value == pytest.approx(ref, rel=1e-6), layout
        assert torch.allclose(grads[layout], grads["per_example"], rtol=1e-6, atol=1e-9), layout
