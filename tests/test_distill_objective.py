"""Distillation in the training loop: exact normalisation (1x8 == 4x2), a teacher equal to the
student, a LoRA student, resume bit for bit, eval keeps the cross-entropy, the logs and report.md,
and the set-ups it refuses."""

from __future__ import annotations

import pytest
import torch

from sftune.errors import ConfigError
from sftune.training import train

from conftest import build_model_dir, train_config
from distill_helpers import records, resumed_at_step_2, weights

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


def config(model_dir, data, out, teacher, **over):
    return train_config(model_dir, data, out, **{"distill.teacher": str(teacher), "train.max_steps": 2,
                                                 "data.max_length": 64, **over})


def run(model_dir, data, out, teacher, **over):
    train(config(model_dir, data, out, teacher, **over))
    return records(out)


@pytest.mark.slow
def test_accumulation_is_exact_and_logged(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """1 x 8 == 4 x 2: same loss per step and same weights (the loss is a sum over positions divided
    by the step's count); the records carry the divergence, the CE and the teacher's CE."""
    spec = {"distill.loss": "jsd", "distill.beta": 0.3, "distill.alpha": 0.6, "distill.temperature": 1.5,
            "distill.top_k": 20}
    a = run(tiny_model_dir, qa_rows_file, tmp_path / "a", teacher_dir, **spec, **{"train.batch_size": 8})
    b = run(tiny_model_dir, qa_rows_file, tmp_path / "b", teacher_dir, **spec,
            **{"train.batch_size": 2, "train.grad_accum": 4})
    for step in (1, 2):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6), (step, key)
        assert a[step]["loss"] == pytest.approx(0.6 * a[step]["distill_loss"] + 0.4 * a[step]["ce_loss"], rel=1e-6)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)  # Adam: near-zero grads
    assert a[1]["distill"]["how"] == "live" and a[1]["distill"]["top_k"] == 20 and "teacher_s_per_step" in a[1]


def test_teacher_equal_to_the_student_teaches_nothing(tiny_model_dir, qa_rows_file, tmp_path):
    r = run(tiny_model_dir, qa_rows_file, tmp_path / "same", tiny_model_dir, **{"train.max_steps": 1})
    assert r[1]["distill_loss"] < 1e-6 and r[1]["grad_norm"] < 1e-5
    assert r[1]["teacher_ce"] == pytest.approx(r[1]["ce_loss"], rel=1e-5)


def test_lora_student_starts_where_the_full_student_starts(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """LoRA's B starts at 0: the step-1 loss equals the full model's; only the adapters train."""
    full = run(tiny_model_dir, qa_rows_file, tmp_path / "full", teacher_dir, **{"train.max_steps": 1})
    lora = run(tiny_model_dir, qa_rows_file, tmp_path / "lora", teacher_dir,
               **{"train.max_steps": 2, "lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})
    assert lora[1]["loss"] == pytest.approx(full[1]["loss"], rel=1e-6)
    assert lora[2]["loss"] < lora[1]["loss"] + 1e-3
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    # a LoRA run as the teacher: base + adapter, merged
    again = run(tiny_model_dir, qa_rows_file, tmp_path / "from_lora", tmp_path / "lora", **{"train.max_steps": 1})
    assert again[1]["distill"]["teacher"] == str(tmp_path / "lora") and again[1]["distill_loss"] > 0


@pytest.mark.slow
def test_resume_is_bit_exact(dropout_model_dir, teacher_dir, qa_rows_file, tmp_path):
    over = {"train.max_steps": 4, "train.save_every": 2, "train.keep_checkpoints": 5, "train.batch_size": 4}
    full, resumed = resumed_at_step_2(
        lambda out, **more: config(dropout_model_dir, qa_rows_file, out, teacher_dir, **over, **more), tmp_path)
    for step in (3, 4):
        assert resumed[step]["loss"] == full[step]["loss"] and resumed[step]["ce_loss"] == full[step]["ce_loss"]


@pytest.mark.slow
def test_compile_gives_the_same_run(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """train.compile=true with a live teacher: the student's body compiled, the objective (divergence,
    teacher call, logged sums) eager across a graph break, the teacher's body compiled on its own.
    Same losses and weights as eager to 1e-5 relative: fp32, where compiled kernels only sum in
    another order (~1e-7 relative here; rows and loss slots bucketed to 128 change nothing)."""
    over = {"train.max_steps": 2, "train.batch_size": 4, "data.limit": 12, "distill.alpha": 0.6, "distill.top_k": 20}
    eager = run(tiny_model_dir, qa_rows_file, tmp_path / "eager", teacher_dir, **over)
    compiled = run(tiny_model_dir, qa_rows_file, tmp_path / "compiled", teacher_dir, **over, **{"train.compile": True})
    for step in (1, 2):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-5), (step, key)
    assert compiled[1]["distill"]["compiled"] and "compiled" not in eager[1]["distill"]
    we, wc = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert all(torch.allclose(we[k], wc[k], rtol=1e-5, atol=1e-6) for k in we)


def test_eval_loss_stays_the_cross_entropy(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """Evaluation reads the student's plain cross-entropy (comparable with plain SFT runs)."""
    over = {"train.max_steps": 1, "data.eval_split": 0.2, "train.lr": 1e-12, "eval.samples": 0}
    plain = train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "plain", **{"data.max_length": 64, **over}))
    dist = train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "dist",
                              **{"data.max_length": 64, "distill.teacher": str(teacher_dir), **over}))
    assert dist.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], rel=1e-6)


def test_report_names_the_teacher(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    from sftune.run_report import build_report

    run(tiny_model_dir, qa_rows_file, tmp_path / "r", teacher_dir, **{"train.max_steps": 1})
    text = build_report(tmp_path / "r").read_text()
    assert "## Distillation" in text and str(teacher_dir) in text and "teacher time" in text
    assert "matches itself run alone in the flat layout" in text  # the teacher's model check


def test_refusals(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    with pytest.raises(ConfigError, match="saved top-k"):
        run(tiny_model_dir, qa_rows_file, tmp_path / "s", teacher_dir, **{"distill.saved": str(tmp_path / "none")})


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """2 ranks x batch 2 x accumulation 2 == 1 process x batch 4 x 2: the divergence's sums are
    normalised by the step's loss count over all ranks, like the cross-entropy."""
    from test_distributed import overrides, torchrun

    spec = {"distill.teacher": str(teacher_dir), "distill.loss": "reverse_kl", "distill.alpha": 0.5,
            "train.max_steps": 2, "data.max_length": 64, "train.grad_accum": 2, "train.max_grad_norm": 1e9}
    one = tmp_path / "one"
    train(train_config(tiny_model_dir, qa_rows_file, one, **spec, **{"train.batch_size": 4}))
    two = tmp_path / "two"
    torchrun(overrides(tiny_model_dir, qa_rows_file, two, **spec, **{"train.batch_size": 2}))
    a, b = records(one), records(two)
    for step in (1, 2):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    wa, wb = weights(one), weights(two)
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


@pytest.mark.distributed
@pytest.mark.parametrize("packing", [False, True])
def test_fsdp_two_ranks_equal_one_process(tiny_model_dir, teacher_dir, tmp_path, packing):
    """FSDP2 full shard of the student (2 ranks x batch 2) with a live teacher == 1 process x batch
    4: the teacher runs whole on each rank (frozen, not a submodule, so not sharded) on that rank's
    rows, and the divergence reads the student's gathered head like the cross-entropy does."""
    from conftest import write_jsonl
    from test_fsdp import ROWS, assert_fsdp, finish, launch, overrides

    from sftune.config import load_config

    data = write_jsonl(tmp_path / "qa.jsonl", ROWS)
    spec = {"distill.teacher": str(teacher_dir), "distill.loss": "jsd", "distill.beta": 0.3, "distill.alpha": 0.7,
            "distill.top_k": 20, "data.packing": packing, "train.max_grad_norm": 1e9}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(overrides(tiny_model_dir, data, two, **spec), wait=False)
    train(load_config("codealpaca", overrides(tiny_model_dir, data, one, **spec, **{"train.batch_size": 4})))
    assert_fsdp(finish(proc))
    a, b = records(one), records(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)
    wa, wb = weights(one), weights(two)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_a_bfloat16_teacher_teaches_what_the_float32_one_does(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """distill.teacher_dtype=bfloat16 (auto's choice on a GPU), here on CPU: the teacher passes its
    check at half precision's tolerance, its logits enter the divergence in float32, and the step
    losses stay within bfloat16's rounding of the float32 teacher's."""
    run(tiny_model_dir, qa_rows_file, tmp_path / "f32", teacher_dir)
    run(tiny_model_dir, qa_rows_file, tmp_path / "bf16", teacher_dir, **{"distill.teacher_dtype": "bfloat16"})
    a, b = records(tmp_path / "f32"), records(tmp_path / "bf16")
    assert b[1]["distill"]["dtype"] == "bfloat16" and b[1]["distill"]["check"]["status"] == "exact"
    for step in (1, 2):
        for key in ("loss", "distill_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=3e-2), (step, key)
    assert b[1]["teacher_ce"] != a[1]["teacher_ce"]  # the teacher did run in bfloat16


def test_an_empty_micro_batch_asks_no_teacher():
    """A rank's empty micro-batch (a partial last step) has no saved rows and needs no teacher run."""
    from sftune.distill.divergence import Spec
    from sftune.distill.objective import Distiller

    head = torch.nn.Linear(4, 7, bias=False)
    kw = {"loss_targets": torch.zeros(0, dtype=torch.long), "loss_weights": None, "loss_extras": {}}
    loss = Distiller(Spec(), None)(None, torch.zeros(0, 4, requires_grad=True), head, kw)
    loss.backward()
    assert loss.item() == 0 and head.weight.grad is not None
