"""What training and ``sftune eval`` measure: loss over completion tokens, and generation metrics.

* :func:`eval_loss` sums the token losses of the eval set and divides by the number of loss tokens
  (the same normalisation as training), so the number does not depend on batch size or packing.
* generation itself lives in :mod:`sftune.generation`; prompts and references come from the run's
  format (:mod:`sftune.data.formats`), so they are built exactly as in training.
* :func:`generation_metrics` compares generations with the reference completions: exact match and
  a normalised contains-match.

Training reads this module during the run; the ``sftune eval`` command is :mod:`sftune.evaluate`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table

from sftune.data.formats import BadRow, Format, TextFormat
from sftune.data.packing import BatchPlan
from sftune.errors import RowSkip
from sftune.generation import generate_with
from sftune.vision_inference import prompt_images, row_and_images
from sftune.console import console


@torch.no_grad()
def eval_loss(model, data, *, batch_size: int, max_length: int, pad_id: int, device, packing: bool = False,
              accelerator=None) -> dict[str, float]:
    """Loss and perplexity of ``model`` (a :class:`~sftune.loss.CausalLMWithLoss`) on a TokenizedSet.

    Under several processes each rank evaluates a share of the batches and the sums are
    all-reduced. Every rank runs the same number of forwards (an empty batch where it has none
    left), as sharded models (FSDP, ZeRO-3) need.
    """
    inner = accelerator.unwrap_model(model) if accelerator else model
    layout = getattr(inner, "layout", None) or ("flat" if getattr(inner, "varlen", False) else "rows")
    plan = BatchPlan.build(data.lengths, batch_size=batch_size, grad_accum=1, packing=packing,
                           max_length=max_length, seed=0, layout=layout)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    order = np.argsort(-plan.unit_lengths, kind="stable").tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches += [[]] * (-len(batches) % world)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for units in batches[rank::world]:
        batch = plan.batch(units, data, pad_id)
        inputs = batch.inputs(device)
        ctx = accelerator.autocast() if accelerator else torch.autocast(device.type, enabled=False)
        with ctx:
            loss_sum = model(**inputs)
        total[0] += loss_sum.double()
        total[1] += batch.w_loss
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1e-12)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


@dataclass
class GenerationExample:
    prompt: str
    reference: str | None
    images: list = field(default_factory=list)
    """The prompt's images (PIL), for an image-text-to-text model (sftune.vision_inference)."""


def prompt_and_reference(fmt: Format, row: dict) -> GenerationExample:
    """The inference prompt for a row (as trained) and the reference completion, if any; a text
    format without a response template is continued from the first half of its text. An image
    conversation's prompt carries its images."""
    row, images = row_and_images(fmt, row)
    reference = fmt.reference(row)
    prompt = fmt.prompt(row)
    if reference is None and isinstance(fmt, TextFormat) and fmt.response_template is None:
        return GenerationExample(prompt[: max(1, len(prompt) // 2)], None)
    return GenerationExample(prompt, reference, prompt_images(fmt, prompt, images))


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (whitespace-stripped) and normalised contains-match, as fractions."""
    n = max(len(references), 1)
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    contains = sum(normalize(r) in normalize(p) for p, r in zip(predictions, references) if normalize(r))
    return {"exact_match": exact / n, "contains_match": contains / n, "n": len(references)}


def generation_examples(fmt: Format, rows, limit: int | None, need_reference: bool = True) -> list[GenerationExample]:
    """Prompts and references for up to ``limit`` rows that format cleanly."""
    out = []
    for row in rows:
        if limit is not None and len(out) >= limit:
            break
        try:
            ex = prompt_and_reference(fmt, row)
        except (RowSkip, BadRow):
            continue
        if ex.reference is not None or not need_reference:
            out.append(ex)
    return out


def sample_generations(cfg, model, tokenizer, data, synced: bool = False) -> list[dict]:
    """Greedy generations for the first ``eval.samples`` eval prompts (logged at each evaluation)."""
    rows = data.source.eval if data.source.eval is not None else data.source.train
    examples = generation_examples(data.fmt, rows, cfg.eval.samples, need_reference=False)
    if not examples:
        return []
    preds = generate_with(data.fmt, model, tokenizer, [e.prompt for e in examples],
                          images=[e.images for e in examples], max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size, synced=synced)
    return [{"prompt": e.prompt, "reference": e.reference, "generated": p} for e, p in zip(examples, preds)]


def generation_eval(cfg, model, tokenizer, data, label: str = "", show: bool = True, synced: bool = False) -> dict:
    """Greedy generation on the eval rows: exact match / contains match, plus a few samples."""

    examples = generation_examples(data.fmt, data.source.eval, cfg.eval.limit)
    if not examples:
        return {"exact_match": 0.0, "contains_match": 0.0, "n": 0, "samples": []}
    preds = generate_with(data.fmt, model, tokenizer, [e.prompt for e in examples],
                          images=[e.images for e in examples], max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size, synced=synced)
    metrics = generation_metrics(preds, [e.reference for e in examples])
    metrics["samples"] = [{"prompt": e.prompt, "reference": e.reference, "generated": p}
                          for e, p in zip(examples[:cfg.eval.samples], preds)]
    if cfg.eval.samples and show:
        t = Table(title=f"Sample generations ({label})" if label else "Sample generations", title_justify="left")
        t.add_column("prompt", overflow="fold", max_width=48)
        t.add_column("generated (stops at EOS by itself)", overflow="fold")
        t.add_column("expected", overflow="fold")
        for s in metrics["samples"]:
            ok = "[green]✓[/]" if s["generated"].strip() == s["reference"].strip() else "[red]✗[/]"
            t.add_row(escape(s["prompt"][-120:]), f"{ok} {escape(repr(s['generated']))}", escape(repr(s["reference"])))
        console.print(t)
    return metrics
