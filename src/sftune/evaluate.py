"""``sftune eval``: a finished run (and optionally a baseline) on held-out data, as a table and JSON.

The measures themselves (eval loss, exact and contains match) are :mod:`sftune.eval_metrics`,
which training uses during the run.
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from sftune.attention import enable_varlen
from sftune.capabilities import capabilities
from sftune.config import load_config, parse_override
from sftune.data.chain import prepare
from sftune.eval_metrics import (  # noqa: F401  (the measures, re-exported for their earlier importers)
    GenerationExample,
    eval_loss,
    generation_eval,
    generation_examples,
    generation_metrics,
    normalize,
    prompt_and_reference,
    sample_generations,
)
from sftune.safeio import dumps
from sftune.data.images import base_dir
from sftune.vision_inference import has_images, prompt_images, row_and_images
from sftune.generation import generate_with
from sftune.inference import load_for_inference
from sftune.loss import CausalLMWithLoss
from sftune.model import resolve_max_length, unwrap_causal_lm
from sftune.console import console
from sftune.console import out as stdout


def evaluate_loaded(loaded, cfg, *, limit: int | None, max_new_tokens: int, batch_size: int,
                    tokenizer=None) -> dict:
    """Loss / perplexity over the completion tokens of ``cfg.data``'s rows, plus generation metrics
    (exact and contains match) for prompt/completion and chat data."""

    tokenizer = tokenizer or loaded.tokenizer
    max_length = resolve_max_length(cfg, tokenizer, loaded.model.config)
    data = prepare(cfg.data, tokenizer, max_length, fmt=loaded.fmt, seed=cfg.train.seed)

    device = next(loaded.model.parameters()).device
    caps = capabilities(loaded.model)  # the fastest exact layout this model takes (see sftune.capabilities)
    layout = caps.layout if caps.layout != "flat" or enable_varlen(unwrap_causal_lm(loaded.model)) else caps.layouts[1]
    lm = CausalLMWithLoss(loaded.model, fused=caps.fused_loss, layout=layout)
    result = eval_loss(lm, data.train, batch_size=8, max_length=max_length, pad_id=tokenizer.pad_token_id,
                       device=device)
    result = {"loss": result["eval_loss"], "perplexity": result["eval_ppl"], "loss_tokens": result["eval_tokens"]}
    examples = generation_examples(data.fmt, data.source.train, limit)
    if examples:
        preds = generate_with(data.fmt, loaded.model, tokenizer, [e.prompt for e in examples],
                              images=[e.images for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size)
        gm = generation_metrics(preds, [e.reference for e in examples])
        result.update({"exact_match": gm["exact_match"], "contains_match": gm["contains_match"],
                       "generated": gm["n"]})
        result["samples"] = [{"prompt": e.prompt, "reference": e.reference, "generated": p}
                             for e, p in zip(examples[:3], preds)]
    result["examples"] = data.report.kept
    return result


def run_eval(model: str, data_path: str, *, split: str | None = None, baseline: str | None = None,
             overrides: list[str] | None = None, limit: int | None = 200, max_new_tokens: int = 128,
             batch_size: int = 16, out: str | None = None) -> dict:
    """``sftune eval``: evaluate a run (and optionally a baseline) on held-out data; table + JSON."""



    loaded = load_for_inference(model)
    if has_images(loaded.fmt):  # relative image paths: the eval file's, not the training data's
        loaded.fmt.base = base_dir(data_path)
    base_cfg = loaded.cfg.model_dump() if loaded.cfg is not None else {}
    data = {**base_cfg.get("data", {}), "path": data_path, "eval_split": None, "limit": limit, "eval_limit": None,
            "shuffle": False, "remove_columns": [], "sources": None, "streaming": False}  # one file, in memory
    if split:
        data["split"] = split
    cfg = load_config(None, {**{f"data.{k}": v for k, v in data.items()},
                             **dict(parse_override(o) for o in overrides or [])})
    results = {model: evaluate_loaded(loaded, cfg, limit=limit, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)}
    if baseline:
        seed = loaded.cfg.train.seed if loaded.cfg is not None else 42
        base = load_for_inference(baseline, init_seed=seed)  # builtin:quickstart: the run's untrained init
        if baseline.startswith("builtin:"):
            console.print(f"baseline {baseline}: the built-in model's initial weights (seed {seed}), i.e. the "
                          "from-scratch run before training", markup=False)
        # prompt the baseline exactly as the fine-tuned model: same format, same tokenizer when compatible
        base.fmt = loaded.fmt
        same_vocab = len(loaded.tokenizer) <= base.model.get_input_embeddings().weight.shape[0]
        results[baseline] = evaluate_loaded(base, cfg, limit=limit, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, tokenizer=loaded.tokenizer if same_vocab else None)


    t = Table(title=f"Evaluation on {escape(data_path)}", title_justify="left")
    t.add_column("metric")
    for name in results:
        t.add_column(escape(name if len(name) < 40 else "…" + name[-39:]), justify="right")
    for key, label in (("loss", "loss (completion tokens)"), ("perplexity", "perplexity"),
                       ("exact_match", "exact match"), ("contains_match", "contains match"),
                       ("examples", "examples (loss)"), ("generated", "examples (generation)")):
        if any(key in r for r in results.values()):
            cells = []
            for r in results.values():
                v = r.get(key)
                cells.append("-" if v is None else f"{100 * v:.1f}%" if "match" in key else
                             f"{v:.4f}" if isinstance(v, float) else str(v))
            t.add_row(label, *cells)
    console.print(t)
    path = Path(out) if out else (Path(model) / "eval.json" if (Path(model) / "sftune_config.yaml").exists()
                                  else Path("eval.json"))
    path.write_text(dumps({"data": data_path, "results": results}, indent=2, ensure_ascii=False))
    console.print(f"wrote {path}", markup=False)
    stdout.print(dumps({k: {m: v for m, v in r.items() if m != "samples"} for k, r in results.items()}),
                 markup=False, highlight=False)
    return results
