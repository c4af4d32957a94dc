"""Saving the trained model in standard Hugging Face form, and ``sftune export``.

The output directory loads with ``AutoModelForCausalLM.from_pretrained`` (full fine-tuning or
``lora.merge``) or ``AutoPeftModelForCausalLM.from_pretrained`` (an adapter). Next to the weights:
the tokenizer, with a chat template that reproduces the training prompt format, a generation
config whose EOS list includes the end-of-turn token, ``sftune_config.yaml`` and
``sftune_lineage.json`` (base model, prompt format identity and hash, data fingerprint, version),
so preference training (DPO, reward models) starts from the same prompt contract.

``sftune export --format gguf`` adds a GGUF file and an Ollama ``Modelfile`` (:mod:`sftune.export_gguf`);
``--verify`` checks that the exported chat template tokenizes the run's own prompts to the ids
sftune trained with (and, with a GGUF, that it loads back with matching logits).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune import __version__
from sftune.config import SFTConfig, config_to_yaml
from sftune.data.formats import Format, normalize_messages
from sftune.data.sources import load_source
from sftune.data.tokenize import SequenceEncoder, special_prefix
from sftune.distributed import is_sharded, plain_copy
from sftune.errors import ConfigError, SftuneError
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
        write_lineage(out_dir, lineage(str(out_dir), cfg, data.fmt, tokenizer))
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


LINEAGE = "sftune_lineage.json"
Q8_0_TOLERANCE = 0.05
"""Largest |logit difference| accepted between a q8_0 GGUF and the exported weights, relative to
max(1, largest |logit|). f16/bf16 files are compared with the weights rounded to that dtype."""


def format_hash(fmt: Format, tokenizer) -> str:
    """A hash of what defines the prompt contract: the format identity, its chat template, the BOS
    rule and the stop tokens."""
    payload = json.dumps({"identity": fmt.identity(), "name": fmt.name, "add_bos": fmt.add_bos,
                          "chat_template": fmt.export_chat_template(tokenizer),
                          "stops": [tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_ids(tokenizer)]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def data_fingerprint(cfg: SFTConfig | None) -> dict | None:
    """sha256 over the training data files (local data), or the hub id (no revision is recorded)."""
    if cfg is None:
        return None
    p = Path(cfg.data.path)
    info = {"path": cfg.data.path, "split": cfg.data.split, "limit": cfg.data.limit}
    if not p.exists():
        return {**info, "sha256": None, "note": "not a local path at export time (a hub dataset?)"}
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return {**info, "sha256": h.hexdigest(), "files": len(files)}


def lineage(source: str, cfg: SFTConfig | None, fmt: Format, tokenizer, **extra) -> dict:
    """What an export came from: base model, prompt format (identity and hash), stops, data, version."""
    base = cfg.model.path if cfg is not None else None
    adapter = Path(source) / "adapter_config.json"
    if adapter.exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path", base)
    stops = fmt.stop_ids(tokenizer)
    return {"sftune_version": __version__, "source": str(source), "base_model": base,
            "lora": bool(cfg is not None and cfg.lora.enabled),
            "format": {"name": fmt.name, "identity": fmt.identity(), "hash": format_hash(fmt, tokenizer),
                       "add_bos": fmt.add_bos, "chat_template": bool(fmt.export_chat_template(tokenizer))},
            "stop_ids": stops, "stop_tokens": [tokenizer.convert_ids_to_tokens(i) for i in stops],
            "data": data_fingerprint(cfg), **extra}


def write_lineage(out_dir: Path, info: dict) -> Path:
    path = Path(out_dir) / LINEAGE
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    return path


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
        from sftune.export_gguf import QUANTS

        if quant not in QUANTS:
            raise ConfigError(f"unknown GGUF quantization '{quant}'; use one of {', '.join(QUANTS)}")
    loaded = load_for_inference(run, dtype="float32", device="cpu")
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if format == "gguf":
        from sftune.export_gguf import check_writable

        check_writable(model, loaded.tokenizer)  # refuse an unsupported family or tokenizer before writing
    tokenizer, fmt = loaded.tokenizer, loaded.fmt
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_generation_stops(model, tokenizer, fmt)
    template = fmt.export_chat_template(tokenizer)
    if template:
        tokenizer.chat_template = template
    saved = model.to(getattr(torch, dtype)) if dtype != "auto" else model
    saved.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if loaded.cfg is not None:
        (out_dir / "sftune_config.yaml").write_text(config_to_yaml(loaded.cfg))
    extra = {}
    if format == "gguf":
        from sftune.export_gguf import write_gguf, write_modelfile

        name = f"model-{quant}.gguf"
        write_gguf(saved, tokenizer, fmt, out_dir / name, quant=quant, name=Path(str(run).rstrip("/")).name or "model")
        header = f"Written by sftune export from {run} (prompt format {fmt.name}, hash {format_hash(fmt, tokenizer)[:12]})"
        write_modelfile(out_dir, name, tokenizer, fmt, header=header)
        extra["gguf"] = {"file": name, "quant": quant}
    write_lineage(out_dir, lineage(run, loaded.cfg, fmt, tokenizer, **extra))
    if push_to_hub:
        saved.push_to_hub(push_to_hub)
        tokenizer.push_to_hub(push_to_hub)
    return out_dir


# ----------------------------------------------------------------------------- --verify


@dataclass
class VerifyResult:
    ok: bool
    lines: list[str] = field(default_factory=list)


def _probe_rows(loaded, n: int) -> tuple[list[dict], str]:
    """Up to ``n`` of the run's own rows (eval split first); none for a plain model."""
    cfg = loaded.cfg
    if cfg is None:
        return [], "typed probes (not an sftune run)"
    try:
        src = load_source(cfg.data)
    except Exception as e:  # noqa: BLE001 - data gone or unreachable: still check typed prompts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [], f"typed probes (the run's data could not be read: {first})"
    rows: list[dict] = []
    for ds in (src.eval, src.train):
        if ds is not None and len(rows) < n:
            rows += [dict(r) for r in ds.select(range(min(n - len(rows), len(ds))))]
    return rows, f"rows of {src.name}"


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _cases(fmt: Format, rows: list[dict], n: int, notes: list[str]) -> list[tuple[str, str, list[dict]]]:
    """``(label, sftune prompt, the same prompt as chat messages)`` for each usable row."""
    cases = []
    for i, row in enumerate(rows):
        try:
            prompt = fmt.prompt(row)
            if fmt.is_chat:
                msgs = normalize_messages(row.get(fmt.column), fmt.column, need_assistant=False)
                last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
                msgs = [{k: v for k, v in m.items() if not k.startswith("_")} for m in msgs[:last]]
            else:
                text = str(row.get((getattr(fmt, "prompt_columns", None) or [""])[0]) or "")
                if fmt.prompt_from_text(text) != prompt:
                    notes.append(f"  row {i}: skipped (its prompt has fields one chat message cannot carry)")
                    continue
                msgs = [{"role": "user", "content": text}]
        except Exception as e:  # noqa: BLE001 - a row the format cannot prompt from
            notes.append(f"  row {i}: skipped ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            continue
        cases.append((f"row {i}", prompt, msgs))
    if not cases:
        for j, text in enumerate(["Hello! Who are you?", "Write a haiku about the sea.", "2+2=?"][:n]):
            cases.append((f"probe {j}", fmt.prompt_from_text(text), [{"role": "user", "content": text}]))
    return cases


def verify_export(run: str, out: str | Path, *, n: int = 5) -> VerifyResult:
    """Render ``n`` of the run's prompts with the exported tokenizer's chat template and check the
    token ids equal the ones sftune trained with: the format's BOS rule + the prompt tokenized with
    no other special tokens (the prefix of each training sequence, as ``sftune.data.tokenize``
    guarantees). With a GGUF in ``out``, its tokenizer must give the same ids and its logits must
    match the exported weights."""
    loaded = load_for_inference(run, dtype="float32", device="cpu")
    fmt, tok = loaded.fmt, loaded.tokenizer
    out = Path(out)
    exported = AutoTokenizer.from_pretrained(str(out))
    res = VerifyResult(ok=True)
    if not getattr(exported, "chat_template", None):
        res.lines.append(f"the run's format ({fmt.name}) exports no chat template: nothing to verify")
        return res
    rows, where = _probe_rows(loaded, n)
    notes: list[str] = []
    cases = _cases(fmt, rows, n, notes)
    prefix = special_prefix(tok) if fmt.add_bos else []
    gguf_tok, gguf_file = None, next(iter(sorted(out.glob("*.gguf"))), None)
    if gguf_file is not None:  # tokenized as llama.cpp does: BOS when the file says so, then the template's text
        from transformers.integrations.gguf import read_gguf_metadata

        meta, _ = read_gguf_metadata(str(gguf_file))
        gguf_tok = AutoTokenizer.from_pretrained(str(out), gguf_file=gguf_file.name)
        gguf_bos = [meta["tokenizer.ggml.bos_token_id"]] if meta.get("tokenizer.ggml.add_bos_token") else []
        gguf_template = meta.get("tokenizer.chat_template")
    res.lines += [f"verifying {len(cases)} prompts ({where}) against {out}"] + notes
    encoder = SequenceEncoder(tok, add_bos=fmt.add_bos)
    for label, prompt, msgs in cases:
        trained = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
        row = rows[int(label.split()[1])] if label.startswith("row") else None
        if row is not None and not _starts_a_training_sequence(fmt, encoder, row, trained):
            res.ok = False
            res.lines.append(f"  FAIL {label}: no training sequence of this row starts with its inference prompt")
        rendered = exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        checks = [("chat template", exported(rendered, add_special_tokens=False)["input_ids"])]
        if gguf_tok is not None:
            text = exported.apply_chat_template(msgs, chat_template=gguf_template, tokenize=False,
                                                add_generation_prompt=True) if gguf_template else ""
            checks.append(("GGUF", gguf_bos + gguf_tok(text, add_special_tokens=False)["input_ids"]))
        for what, ids in checks:
            if ids == trained:
                res.lines.append(f"  PASS {label} ({what}): {len(ids)} tokens equal")
                continue
            res.ok = False
            k = _first_diff(ids, trained)
            res.lines.append(f"  FAIL {label} ({what}): token {k} differs: trained "
                             f"{tok.convert_ids_to_tokens(trained[k:k + 3])} vs exported "
                             f"{tok.convert_ids_to_tokens(ids[k:k + 3])} ({len(trained)} vs {len(ids)} tokens)")
    if gguf_file is not None:
        ids = prefix + tok(cases[0][1], add_special_tokens=False)["input_ids"]
        res.lines.append("  " + _check_gguf_logits(out, gguf_file, ids, res))
    return res


def _starts_a_training_sequence(fmt: Format, encoder, row: dict, ids: list[int]) -> bool:
    """Whether one of the row's training sequences, tokenized as in training, begins with ``ids``
    (a row training skips, e.g. one without a completion, has nothing to compare and passes)."""
    try:
        sequences = fmt.render(row).sequences
    except Exception:  # noqa: BLE001 - RowSkip / BadRow: not a training row
        return True
    examples = [ex for seq in sequences for ex in encoder.encode(seq)]
    examples += [ex for seq in sequences for t in seq.turns if t.standalone for ex in encoder.encode(t.standalone)]
    return not examples or any(ex.input_ids[:len(ids)] == ids for ex in examples)


def _check_gguf_logits(out: Path, gguf_file: Path, ids: list[int], res: VerifyResult) -> str:
    """The GGUF loaded back by transformers against the exported weights (rounded as the file stores them)."""

    info = json.loads((out / LINEAGE).read_text()) if (out / LINEAGE).exists() else {}
    quant = (info.get("gguf") or {}).get("quant", "q8_0")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    if hf.config.model_type == "gpt2" and hf.config.n_positions != 1024:
        return (f"SKIP GGUF logits: transformers' GGUF reader gives GPT-2 1024 positions, this model has "
                f"{hf.config.n_positions} (llama.cpp reads the file's own context length)")
    params = getattr(hf.config.get_text_config(), "rope_parameters", None) or {}
    if any((r or {}).get("rope_type", "default") != "default"
           for r in (params.values() if "full_attention" in params else [params])):
        return "SKIP GGUF logits: transformers' GGUF reader ignores RoPE scaling (llama.cpp reads it from the file)"
    try:
        g = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=gguf_file.name, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001
        res.ok = False
        return f"FAIL GGUF logits: transformers could not load {gguf_file.name}: {str(e).splitlines()[0]}"
    if quant in ("f16", "bf16"):
        dt = torch.float16 if quant == "f16" else torch.bfloat16
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.copy_(p.to(dt).float())
    x = torch.tensor([ids[-256:]])
    with torch.no_grad():
        a, b = hf(x).logits, g(x).logits
    diff = (a - b).abs().max().item()
    tol = (1e-3 if quant in ("f16", "bf16") else Q8_0_TOLERANCE) * max(1.0, a.abs().max().item())
    if diff <= tol:
        return f"PASS GGUF logits ({quant}): max |difference| {diff:.2e} <= {tol:.2e}"
    res.ok = False
    return f"FAIL GGUF logits ({quant}): max |difference| {diff:.2e} > {tol:.2e}"
