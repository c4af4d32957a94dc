"""The anchor: sftune's distillation step-1 loss equals TRL's experimental GKD trainer (lmbda=0: only the
dataset's completions, no student generations) for beta 0 (forward KL), 0.5 (JSD) and 1 (reverse KL).

Both read the same 8 pre-tokenized rows of one length (TRL's ChatML collator pads on the left and
GPT-2 does not derive positions from the attention mask, so equal lengths keep both exact), prompt
tokens masked by ``completion_mask``, the same tiny student and teacher, in one optimizer step. TRL's
GKD applies no temperature to the loss (its ``temperature`` is the sampling one) and no CE term:
sftune runs ``distill.alpha=1``, ``distill.temperature=1``, ``distill.loss=jsd`` with ``distill.beta``.
With TRL installed both run; otherwise the loss is checked against GOLDEN (recorded from TRL 1.16 by
this test: SFTUNE_TEST_TRL=1 prints them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
from datasets import Dataset

from sftune.config import load_config
from sftune.data.pretokenized import PretokenizedFormat
from sftune.data.sources import Source, with_row_index
from sftune.training import train

from conftest import build_model_dir

HAS_TRL = importlib.util.find_spec("trl") is not None and not os.environ.get("SFTUNE_TEST_GOLDEN")

# step-1 loss of TRL 1.16's experimental GKDTrainer (lmbda=0) on these rows and models, recorded by this test
GOLDEN = {0.0: 0.8808452486991882, 0.5: 0.18687817454338074, 1.0: 0.932427704334259}


def rows() -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(8):
        prompt = rng.randint(3, 9)
        ids = [rng.randrange(1, 400) for _ in range(24)]
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (24 - prompt)})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("gkd")
    student = build_model_dir(root / "student", tiny_tokenizer)
    teacher = build_model_dir(root / "teacher", tiny_tokenizer, n_embd=48, n_layer=3, initializer_range=0.2)
    return student, teacher


def sftune_loss(student, teacher, beta: float, out: Path) -> float:
    cfg = load_config(None, {"model.path": str(student), "train.output_dir": str(out), "train.max_steps": 1,
                             "train.batch_size": 8, "train.lr": 1e-3, "train.log_every": 1, "train.warmup_steps": 0,
                             "data.max_length": 64, "distill.teacher": str(teacher), "distill.loss": "jsd",
                             "distill.beta": beta, "distill.alpha": 1.0, "distill.temperature": 1.0})
    ds = Dataset.from_list(rows())
    train(cfg, source=Source(train=with_row_index(ds), eval=None, name="rows", rows_read=len(ds)),
          fmt=PretokenizedFormat(completion_only=True))
    rec = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rec if r.get("step") == 1 and "loss" in r)


def trl_loss(student, teacher, beta: float, out: Path) -> float:
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tok = AutoTokenizer.from_pretrained(str(student))
    tok.pad_token = tok.eos_token
    args = GKDConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=8, learning_rate=1e-3,
                     logging_steps=1, lmbda=0.0, beta=beta, report_to="none", save_strategy="no", use_cpu=True,
                     bf16=False, seed=0, max_length=64)
    trainer = GKDTrainer(model=str(student), teacher_model=str(teacher), args=args,
                         train_dataset=Dataset.from_list([{**r, "prompt": "unused"} for r in rows()]),
                         processing_class=tok)  # (the collator reads "prompt" first; completion_mask decides)
    trainer.train()
    return next(r["loss"] for r in trainer.state.log_history if r.get("step") == 1 and "loss" in r)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_step1_loss_equals_trl_gkd(beta, models, tmp_path, no_plots):
    student, teacher = models
    loss = sftune_loss(student, teacher, beta, tmp_path / "sftune")
    if HAS_TRL:
        ref = trl_loss(student, teacher, beta, tmp_path / "trl")
        print(f"GOLDEN {beta!r}: {ref!r}")
    else:
        ref = GOLDEN[beta]
    assert loss == pytest.approx(ref, rel=1e-5)
