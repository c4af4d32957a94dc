"""Where an sftune training step spends its time, on the benchmark's W1 batches.

    python bench/profile_step.py [--workload W1|W2] [--steps 5]

The model is distilgpt2-shaped (see vs_trl.py). Each component is timed forward + backward on the
exact tensors of real micro-batches: the attention sub-blocks (ln_1 + attention), the MLP
sub-blocks (ln_2 + MLP), the lm_head + chunked loss, the AdamW step, and data (the batch plan
and collation), with sftune's defaults (one flat row per micro-batch, per-example attention). The rest of a full step (embeddings, residual adds, autograd bookkeeping) is the
remainder. Prints a table and the share of the measured step time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (shared set-up: the model, the data, the encoding)


def timed(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="W1", choices=["W1", "W2"])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.data.packing import BatchPlan
    from sftune.loss import CausalLMWithLoss, linear_cross_entropy_sum
    from sftune.attention import enable_varlen
    from sftune.model import fast_activations

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        vs_trl.build_model(Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    fast_activations(model)
    enable_varlen(model)
    tok = AutoTokenizer.from_pretrained(str(vs_trl.TOKENIZER))
    rows = vs_trl.rows_for(args.workload, 8 * args.steps)
    examples = []
    for r in rows:
        p, c = vs_trl.encode(tok, r)
        ids = (p + c)[:vs_trl.MAX_LENGTH]
        examples.append((ids, ([-100] * len(p) + c)[:vs_trl.MAX_LENGTH]))

    class Data:
        def example(self, i):
            return examples[i]

    data = Data()
    plan = BatchPlan.build([len(e[0]) for e in examples], batch_size=8, grad_accum=1, packing=False,
                           max_length=vs_trl.MAX_LENGTH, seed=0, layout="flat")
    steps = plan.epoch_steps(0)
    lm = CausalLMWithLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    body = model.transformer
    parts = {"attention (ln_1 + attn)": 0.0, "MLP (ln_2 + mlp)": 0.0, "lm_head + loss": 0.0, "optimizer": 0.0,
             "data (plan + collate)": 0.0, "full step": 0.0}
    tokens = 0
    for step in steps:
        t = time.perf_counter()
        batch = plan.batch(plan.micro_batches(step)[0], data, tok.eos_token_id)
        parts["data (plan + collate)"] += time.perf_counter() - t
        tokens += batch.real_tokens
        inputs = (batch.input_ids, batch.position_ids, batch.loss_index, batch.loss_targets,
                  batch.doc_bounds)

        def full():
            lm(*inputs).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        parts["full step"] += timed(full, reps=1)
        # the inputs each sub-block sees, captured from one forward
        captured = {}
        hooks = [body.h[0].attn.register_forward_pre_hook(lambda m, a, k: captured.setdefault("attn_kw", k) and None,
                                                          with_kwargs=True)]
        with torch.no_grad():
            out = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       doc_bounds=batch.doc_bounds, attention_mask=torch.ones_like(batch.input_ids))
        for h in hooks:
            h.remove()
        x = torch.randn(*batch.input_ids.shape, model.config.n_embd, requires_grad=True)
        kw = {k: v for k, v in captured["attn_kw"].items() if k != "hidden_states"}
        for block in body.h:
            def attn_fb(block=block):
                y = block.attn(block.ln_1(x), **kw)[0]
                y.sum().backward()

            def mlp_fb(block=block):
                y = block.mlp(block.ln_2(x))
                y.sum().backward()

            parts["attention (ln_1 + attn)"] += timed(attn_fb, reps=1)
            parts["MLP (ln_2 + mlp)"] += timed(mlp_fb, reps=1)
        hidden = out.last_hidden_state.reshape(-1, model.config.n_embd).index_select(0, batch.loss_index)
        hidden = hidden.detach().requires_grad_(True)
        parts["lm_head + loss"] += timed(
            lambda: linear_cross_entropy_sum(hidden, model.lm_head.weight, batch.loss_targets).backward(), reps=1)
    # the optimizer with real gradients
    lm(*inputs).backward()
    t = time.perf_counter()
    opt.step()
    parts["optimizer"] = (time.perf_counter() - t) * len(steps)
    model.zero_grad(set_to_none=True)

    total = parts["full step"] + parts["data (plan + collate)"]
    console = Console(width=120)
    t = Table(title=f"sftune step profile, {args.workload}, {len(steps)} micro-batches of 8 examples, "
                    f"{tokens:,} tokens ({tokens / total:.0f} tok/s)", title_justify="left")
    t.add_column("component")
    t.add_column("seconds", justify="right")
    t.add_column("share of step", justify="right")
    measured = 0.0
    for name, sec in parts.items():
        if name == "full step":
            continue
        measured += sec
        t.add_row(name, f"{sec:.2f}", f"{100 * sec / total:.1f}%")
    t.add_row("other (embeddings, residuals, autograd)", f"{max(total - measured, 0):.2f}",
              f"{100 * max(total - measured, 0) / total:.1f}%")
    t.add_row("step (data + forward + backward + optimizer)", f"{total:.2f}", "100%")
    console.print(t)
    print(json.dumps({k: round(v, 3) for k, v in parts.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
