"""Saving the trained model in standard Hugging Face form, and ``sftune export``.

The output directory loads with ``AutoModelForCausalLM.from_pretrained`` (full fine-tuning or
``lora.merge``) or ``AutoPeftModelForCausalLM.from_pretrained`` (an adapter). Next to the weights:
the tokenizer, with a chat template that reproduces the training prompt format, a generation
config whose EOS list includes the end-of-turn token, ``sftune_config.yaml`` and
``sftune_lineage.json`` (base model, prompt format identity and hash, data fingerprint, version),
so preference training (DPO, reward models) starts from the same prompt contract. Last,
``sftune_manifest.json`` records the size and SHA-256 of each file the save wrote; loading the model
for inference (generate, chat, eval, export) checks them first (:mod:`sftune.digests`).

``sftune export --format gguf`` adds a GGUF file and an Ollama ``Modelfile`` (:mod:`sftune.export.gguf`);
``--verify`` checks that the exported chat template tokenizes the run's own prompts to the ids
sftune trained with (and, with a GGUF, that it loads back with matching logits).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sftune.config import Config, config_to_yaml
from sftune.data.formats import Format
from sftune.digests import model_snapshot, record_model
from sftune.distributed import is_sharded, plain_copy
from sftune.errors import ConfigError, SftuneError
from sftune.inference import load_for_inference
from sftune.vision_inference import save_processor


from sftune.export.lineage import format_hash, lineage, write_lineage


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


def check_export_target(out_dir: Path) -> None:
    """Refuse, in one line, an export target that is a file or cannot be created."""
    for p in [out_dir, *out_dir.parents]:
        if p.exists():
            if not p.is_dir():
                raise SftuneError(f"cannot export to {out_dir}: {p} exists and is a file, not a directory; "
                                  "choose another --out")
            if not os.access(p, os.W_OK | os.X_OK):
                raise SftuneError(f"cannot export to {out_dir}: {p} is not writable (permission denied)")
            break


def export_run(run: str, out: str, *, dtype: str = "auto", push_to_hub: str | None = None, format: str = "hf",
               quant: str = "f16") -> Path:
    """``sftune export``: merge LoRA into the base weights (when there is an adapter) and save
    safetensors, the tokenizer with its chat/prompt template, the generation stops and the lineage,
    so ``transformers.pipeline`` and preference trainers prompt as trained. ``format="gguf"`` also
    writes ``model-<quant>.gguf`` and an Ollama ``Modelfile``."""
    check_export_target(Path(out))
    if format not in ("hf", "gguf"):
        raise ConfigError(f"unknown export format '{format}'; use hf or gguf")
    if format == "gguf":
        from sftune.export.gguf import QUANTS

        if quant not in QUANTS:
            raise ConfigError(f"unknown GGUF quantization '{quant}'; use one of {', '.join(QUANTS)}")
    loaded = load_for_inference(run, dtype="float32", device="cpu")
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if format == "gguf":
        from sftune.export.gguf import check_writable

        check_writable(model, loaded.tokenizer)  # refuse an unsupported family or tokenizer before writing
    tokenizer, fmt = loaded.tokenizer, loaded.fmt
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = model_snapshot(out_dir)
    set_generation_stops(model, tokenizer, fmt)
    template = fmt.export_chat_template(tokenizer)
    if template:
        tokenizer.chat_template = template
    saved = model.to(getattr(torch, dtype)) if dtype != "auto" else model
    saved.save_pretrained(str(out_dir), safe_serialization=True)
    save_processor(tokenizer, out_dir)
    tokenizer.save_pretrained(str(out_dir))
    if loaded.cfg is not None:
        (out_dir / "sftune_config.yaml").write_text(config_to_yaml(loaded.cfg))
    extra = {}
    if format == "gguf":
        from sftune.export.gguf import write_gguf
        from sftune.export.ollama import write_modelfile

        name = f"model-{quant}.gguf"
        write_gguf(saved, tokenizer, fmt, out_dir / name, quant=quant, name=Path(str(run).rstrip("/")).name or "model")
        header = f"Written by sftune export from {run} (prompt format {fmt.name}, hash {format_hash(fmt, tokenizer)[:12]})"
        write_modelfile(out_dir, name, tokenizer, fmt, header=header)
        extra["gguf"] = {"file": name, "quant": quant}
    write_lineage(out_dir, lineage(run, loaded.cfg, fmt, tokenizer, **extra))
    record_model(out_dir, before)
    if push_to_hub:
        saved.push_to_hub(push_to_hub)
        tokenizer.push_to_hub(push_to_hub)
    return out_dir
