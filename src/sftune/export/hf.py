"""``sftune export``: a finished run in standard Hugging Face form (the final save itself, which
training calls, is :mod:`sftune.export.save`).

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

from sftune.config import config_to_yaml
from sftune.digests import model_snapshot, record_model
from sftune.errors import ConfigError, SftuneError
from sftune.export.lineage import format_hash, lineage, write_lineage
from sftune.export.save import resolved_config, set_generation_stops
from sftune.inference import load_for_inference
from sftune.vision_inference import save_processor

__all__ = ["check_export_target", "export_run", "resolved_config"]


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
