"""The optimizer's parameter groups and the schedule (sftune.optim)."""

from __future__ import annotations

import torch

from sftune.optim import make_scheduler, param_groups

from conftest import train_config


def test_weight_decay_on_matrices_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_warmup_ratio_and_constant_schedule(tiny_model_dir, qa_rows_file, tmp_path):
    cfg = train_config(tiny_model_dir, qa_rows_file, tmp_path, **{"train.warmup_ratio": 0.25,
                                                                  "train.scheduler": "constant"})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(cfg, opt, total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # 2 warmup steps, then flat
