"""Sharded engines (FSDP2, DeepSpeed ZeRO-3): what sftune does differently when no rank holds the
whole model.

* :func:`is_sharded`: every rank must take part in every forward (eval, generation).
* :func:`whole_root`: generation calls the causal LM inside the prepared wrapper, not the wrapper,
  so FSDP2's root unit (embeddings, final norm, head: what is not in a per-block unit) must be
  gathered around it.
* :func:`plain_copy`: an unsharded copy of the model holding the gathered full state dict, for
  what needs real tensors on rank 0 (peft's adapter save, merging LoRA).

All of this runs in the tests on CPU ranks over gloo (``tests/test_fsdp.py``).
"""

from __future__ import annotations

import contextlib

import torch


def is_sharded(accelerator) -> bool:
    """FSDP or ZeRO-3: every rank must take part in every forward (generation included)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def fill_deepspeed_batch_size(accelerator, batch_size: int) -> None:
    """DeepSpeed's ``train_micro_batch_size_per_gpu``: accelerate fills an ``auto`` value from a
    prepared dataloader, but sftune prepares none (it batches with its own plan), so
    ``accelerator.prepare`` would refuse the model. It is ``train.batch_size`` per device."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


@contextlib.contextmanager
def whole_root(prepared: torch.nn.Module):
    """Gather an FSDP2 root unit's own parameters for forwards that bypass the root's forward
    (``generate`` on the inner model); a no-op for anything else.

    FSDP2 decides which unit is the root on the first forward and requires that to be the root;
    generation before training (``eval.exact_match``) would otherwise make a transformer block the
    root. So the root is initialised here first, then unsharded, and resharded afterwards.
    Call on every rank.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()
    if not isinstance(prepared, FSDPModule):
        yield
        return
    state = prepared._get_fsdp_state()
    state._lazy_init()  # private, but the only way to make this unit the root without a forward
    prepared.unshard()
    try:
        yield
    finally:
        prepared.reshard()


def plain_copy(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """An unsharded copy of ``model`` (a transformers model, or a peft model around one) holding
    ``state_dict`` (the full state dict gathered on rank 0), built on the meta device and
    assigned, so no second set of weights is allocated."""
    from transformers import AutoModelForCausalLM

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state_dict.values())).dtype)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        name = getattr(model, "active_adapter", "default")
        copy = get_peft_model(copy, model.peft_config[name], adapter_name=name)
    missing, unexpected = copy.load_state_dict(state_dict, strict=False, assign=True)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    left = [k for k in missing if any(p.is_meta for n, p in copy.named_parameters() if n == k)]
    if left or unexpected:
        raise RuntimeError(f"gathered state dict does not fit the model: missing {left[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    copy.generation_config = base.generation_config
    return copy
