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


def roberta_dir(path, tokenizer):
    """A RoBERTa-style decoder: it numbers positions itself from ``padding_idx + 1``, so given sftune's
    ``position_ids`` it differs in every row layout (the student's probe refuses it as a model)."""
    from transformers import RobertaConfig, RobertaForCausalLM

    torch.manual_seed(0)
    RobertaForCausalLM(RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=260, is_decoder=True, pad_token_id=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_teacher_dir(tmp_path_factory, tiny_tokenizer):
    from test_model_families import _cfg

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_teacher")
    AutoModelForCausalLM.from_config(_cfg("llama", len(tiny_tokenizer))).save_pretrained(str(path))
    tiny_tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_teacher_that_matches_passes_the_check_in_every_layout(family, teacher_dir, llama_teacher_dir,
                                                                 tiny_tokenizer):
    """The student's probe, run on the teacher in the student's layout (and distill-prepare's padded
    rows): GPT-2 and Llama give the outputs of the plain model called one example at a time."""
    path = str(teacher_dir if family == "gpt2" else llama_teacher_dir)
    for layout in ("flat", "rows", "per_example", "padded"):
        t = load_teacher(path, tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"), "float32", layout, EXAMPLES)
        assert t.check["status"] == "exact" and t.check["layout"] == layout and t.check["examples"] == 3, layout
        assert t.check["max_diff"] < 1e-4 and t.describe()["check"] == t.check


def test_a_teacher_that_numbers_positions_its_own_way_is_refused(tmp_path, tiny_tokenizer):
    """RoBERTa-style positions: refused in the student's layouts, naming the teacher, the layout and
    what to do; distill-prepare's padded rows (the model numbers positions itself) pass, with the
    model's own logits (RoBERTa's head transforms the body's output before its linear decoder: the
    probe finds that the chunked head is not the model's, 2e-3 apart here)."""
    path = str(roberta_dir(tmp_path / "roberta", tiny_tokenizer))
    for layout in ("flat", "per_example"):  # its capabilities (rows: its masks do not read position_ids)
        with pytest.raises(ConfigError) as e:
            load_teacher(path, tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"), "float32", layout, EXAMPLES)
        msg = str(e.value)
        assert path in msg and "roberta" in msg and f"the student's {layout} layout" in msg, msg
        assert "another family" in msg and "distill-prepare" in msg and "distill.saved" in msg, msg
    t = load_teacher(path, tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"), "float32", "padded", EXAMPLES)
    assert t.check["status"] == "exact" and "logits" in t.check and not t.lm.fused
    off = load_teacher(path, tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"), "float32", "per_example",
                       EXAMPLES, check="off")  # model.check=off: the user's call, as for the student
    assert off.check == {"status": "off"}
    # distill-prepare's padded rows are checked whatever model.check says: the check decides the head
    prep = load_teacher(path, tiny_tokenizer, len(tiny_tokenizer), torch.device("cpu"), "float32", "padded",
                        EXAMPLES, check="off")
    assert prep.check["status"] == "exact" and not prep.lm.fused
