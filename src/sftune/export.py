"""Saving the trained model in standard Hugging Face form.

The output directory loads with ``AutoModelForCausalLM.from_pretrained`` (full fine-tuning or
``lora.merge``) or ``AutoPeftModelForCausalLM.from_pretrained`` (an adapter). Next to the weights:
the tokenizer, with a chat template that reproduces the training prompt format, a generation
config whose EOS list includes the end-of-turn token, and ``sftune_config.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftune.config import SFTConfig, config_to_yaml
from sftune.data.formats import Format
from sftune.distributed import is_sharded, plain_copy
from sftune.inference import load_for_inference


def resolved_config(cfg: SFTConfig, fmt) -> SFTConfig:
    """The config with the data format spelled out, so inference rebuilds the training prompt."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=fmt.identity())})


def save_tokenizer_and_templates(cfg: SFTConfig, tokenizer, fmt: Format, out_dir: Path) -> None:
    """The tokenizer with the format's chat template (so ``transformers.pipeline`` prompts as
    trained) and the config with the format's identity."""
    template = fmt.export_chat_template(tokenizer)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "sftune_config.yaml").write_text(config_to_yaml(resolved_config(cfg, fmt)))


def set_generation_stops(model, tokenizer, fmt: Format) -> None:
    """``generation_config`` stops at the format's end-of-turn token(s) as well as EOS."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    stops = fmt.stop_ids(tokenizer)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id


def save_final(cfg: SFTConfig, accelerator, lm, tokenizer, out_dir: Path, data) -> None:
    """Save the trained model (rank 0 writes; under FSDP the full state dict is gathered first)."""
    accelerator.wait_for_everyone()
    wrapper = accelerator.unwrap_model(lm)
    model = wrapper.model
    state_dict = accelerator.get_state_dict(lm)  # gathers shards under FSDP / ZeRO-3
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        prefix = "model."
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        if cfg.lora.enabled and is_sharded(accelerator):
            # the live model holds shards; peft's save and merge need the whole adapter and base
            model = plain_copy(model, state_dict)
        set_generation_stops(model, tokenizer, data.fmt)
        if cfg.lora.enabled and cfg.lora.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(str(out_dir), safe_serialization=True)
        elif cfg.lora.enabled:
            model.save_pretrained(str(out_dir), safe_serialization=True)
        else:
            model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        save_tokenizer_and_templates(cfg, tokenizer, data.fmt, out_dir)
    accelerator.wait_for_everyone()


def export_run(run: str, out: str, *, dtype: str = "auto", push_to_hub: str | None = None) -> Path:
    """``sftune export``: merge LoRA into the base weights (when there is an adapter) and save
    safetensors, the tokenizer and its chat/prompt template, so ``transformers.pipeline`` works."""
    loaded = load_for_inference(run, dtype=dtype if dtype != "auto" else "float32", device="cpu")
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_generation_stops(model, loaded.tokenizer, loaded.fmt)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(out_dir))
    if loaded.cfg is not None:
        (out_dir / "sftune_config.yaml").write_text(config_to_yaml(loaded.cfg))
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        loaded.tokenizer.push_to_hub(push_to_hub)
    return out_dir
