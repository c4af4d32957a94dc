"""The optimizer and the learning-rate schedule of a run.

AdamW, fused where torch has a kernel for the device; weight decay on matrices only; per-part
learning rates of an image-text-to-text model (``vision.lr_*``, :mod:`sftune.vision_parts`); the
schedule with warmup from ``train.scheduler``.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from sftune.config import Config
from sftune.speedups import adamw_8bit
from sftune.vision_parts import part_groups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on biases, norm weights or other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or ".ln_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (CUDA, and CPU since torch 2.4:
    several times faster than foreach and without its temporaries), else foreach."""
    kw = dict(lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    groups = part_groups(param_groups(model, cfg.train.weight_decay), cfg.vision, model)  # vision.lr_*
    if cfg.train.optimizer == "adamw_8bit":  # sftune.speedups: bitsandbytes, CUDA only
        return adamw_8bit(groups, kw, device)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    warmup = cfg.train.warmup_steps or int(math.ceil(cfg.train.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(cfg.train.scheduler, cfg.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
