"""``sftune export --verify``: the exported files match the digests export recorded, the run's own files
those of its final save (:mod:`sftune.digests`), the exported chat template tokenizes the run's own prompts to the ids
sftune trained with, each prompt starts a training sequence, and a GGUF file loads back with
matching logits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune.data.formats import Format, normalize_messages
from sftune.data.sources import load_source
from sftune.data.tokenize import SequenceEncoder, special_prefix
from sftune.digests import check_model
from sftune.errors import SftuneError
from sftune.inference import load_for_inference
from sftune.vision_inference import has_images, verify_image_generation


from sftune.export.lineage import LINEAGE, Q8_0_TOLERANCE


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


def _cases(fmt: Format, rows: list[dict], n: int, notes: list[str]) -> list[tuple[str, str, list[dict], dict]]:
    """``(label, sftune prompt, the same prompt as chat messages, the render's other arguments:
    tools and template kwargs)`` for each usable row."""
    cases = []
    for i, row in enumerate(rows):
        try:
            prompt = fmt.prompt(row)
            kw: dict = {}
            if hasattr(fmt, "prompt_messages"):  # chat: the row's tools and template kwargs too
                msgs, kw = fmt.prompt_messages(row)
            elif fmt.is_chat:
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
        cases.append((f"row {i}", prompt, msgs, kw))
    if not cases:
        for j, text in enumerate(["Hello! Who are you?", "Write a haiku about the sea.", "2+2=?"][:n]):
            kw = {"tools": fmt.tools, **fmt.kwargs} if hasattr(fmt, "prompt_messages") else {}
            cases.append((f"probe {j}", fmt.prompt_from_text(text), [{"role": "user", "content": text}], kw))
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
    res = VerifyResult(ok=True)
    try:
        check_model(out)  # the exported files, as export wrote them (sftune.digests); the checks below go on
    except SftuneError as e:
        res.ok = False
        res.lines.append(f"FAIL files: {e}")
    exported = AutoTokenizer.from_pretrained(str(out))
    if not getattr(exported, "chat_template", None):
        res.lines.append(f"the run's format ({fmt.name}) exports no chat template: no prompt to verify")
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
    for label, prompt, msgs, kw in cases:
        trained = prefix + tok(prompt, add_special_tokens=False)["input_ids"]
        row = rows[int(label.split()[1])] if label.startswith("row") else None
        if row is not None and not _starts_a_training_sequence(fmt, encoder, row, trained):
            res.ok = False
            res.lines.append(f"  FAIL {label}: no training sequence of this row starts with its inference prompt")
        rendered = exported.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        checks = [("chat template", exported(rendered, add_special_tokens=False)["input_ids"])]
        if gguf_tok is not None:
            text = exported.apply_chat_template(msgs, chat_template=gguf_template, tokenize=False,
                                                add_generation_prompt=True, **kw) if gguf_template else ""
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
    if has_images(fmt):  # an image-text-to-text model: the export generates from an image as the run does
        ok, lines = verify_image_generation(loaded, out, rows)
        res.ok, res.lines = res.ok and ok, res.lines + lines
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
