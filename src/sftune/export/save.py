"""The final save of a training run: the model in standard Hugging Face form, with what inference
and preference trainers need beside it (the tokenizer with the training prompt's chat template, the
generation stops, ``sftune_config.yaml`` with the format spelled out, ``sftune_lineage.json``).

Training calls :func:`save_final`; ``sftune export`` (:mod:`sftune.export.hf`, a command) reuses
the helpers on a finished run.
"""

from __future__ import annotations

from pathlib import Path

from sftune.config import Config, config_to_yaml
from sftune.data.formats import Format
from sftune.digests import model_snapshot, record_model
from sftune.distributed import is_sharded, plain_copy
from sftune.export.lineage import lineage, write_lineage
from sftune.vision_inference import save_processor


def resolved_config(cfg: Config, fmt) -> Config:
    """The config with the data format spelled out, so inference rebuilds the training prompt."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=fmt.identity())})


def save_tokenizer_and_templates(cfg: Config, tokenizer, fmt: Format, out_dir: Path) -> None:
    """The tokenizer with the format's chat template (so ``transformers.pipeline`` prompts as
    trained) and the config with the format's identity."""
    template = fmt.export_chat_template(tokenizer)
    if template:
        tokenizer.chat_template = template
    save_processor(tokenizer, out_dir)  # an image-text-to-text model's processor (sftune.vision_inference)
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


def save_final(cfg: Config, accelerator, lm, tokenizer, out_dir: Path, data) -> None:
    """Save the trained model (rank 0 writes; under FSDP the full state dict is gathered first)."""
    accelerator.wait_for_everyone()
    wrapper = accelerator.unwrap_model(lm)
    model = wrapper.model
    state_dict = accelerator.get_state_dict(lm)  # gathers shards under FSDP / ZeRO-3
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        before = model_snapshot(out_dir)
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
        write_lineage(out_dir, lineage(str(out_dir), cfg, data.fmt, tokenizer))
        record_model(out_dir, before)  # sftune_manifest.json: what was written, checked when loaded
    accelerator.wait_for_everyone()
