"""sftune vs TRL's SFTTrainer, side by side, on the tutorials' workloads.

    pip install -e ".[bench]"            # adds the newest TRL and psutil
    python bench/vs_trl.py               # W1-W3, about 10 minutes on 2 CPU cores
    python bench/vs_trl.py --quick       # fewer examples per workload
    python bench/vs_trl.py --workloads W1 --contenders sftune,trl_best
    python bench/vs_trl.py --busy --quick --workloads W1   # each contender beside one busy process

Every contender trains the same model (distilgpt2's exact shape, initialised from one seed, fp32 on
CPU, the real GPT-2 tokenizer from ../shared) on the same examples, for one epoch, with the same
learning rate and schedule. Each runs in its own process, so its peak resident memory is its own.

Workloads (data from ../shared/data):
  W1  CodeAlpaca, "### Question: …\\n ### Answer: …", loss on the answer (+EOS) only, max_length 512
  W2  IMDb reviews, plain text, max_length 512
  W3  W1 with LoRA r=16 on all linear layers

Contenders:
  trl_default  TRL as a user runs it: no packing, its default gradient checkpointing
  trl_best     TRL at its best: packing=True (bfd), padding_free, no gradient checkpointing
  sftune       sftune with its defaults
  sftune_trl1  trl_default's script unchanged but for its import (from sftune import SFTConfig, SFTTrainer)

Reported per contender: trained tokens/s (non-padding tokens per second of training, after the
warm-up steps), peak resident memory, training loss (mean over the epoch's steps) and the loss of
the final model on 16 held-out rows (one measurement for all, so "learned the same" is checked on
equal terms); for sftune,
ratios against both TRL columns and MFU (FLOP formula printed). The table is printed and written as
JSON; the last line is a one-line summary per workload.

``--busy``: each contender runs beside one busy neighbour (a plain Python loop pinned to the last
CPU), started before the contender and stopped after it, as on a laptop with a browser or a CI box
running tests in parallel. Both use their default thread choice: torch's one thread per core for
TRL, ``sftune.threads`` for sftune. Written to ``bench/results_busy.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "gpt2-tokenizer"
CODEALPACA = SHARED / "data" / "codealpaca_2k.json"
IMDB = SHARED / "data" / "imdb_5000.jsonl"
MAX_LENGTH = 512
BATCH = 8
LR = 5e-5
WARMUP_STEPS = 1  # optimizer steps excluded from the throughput
CONTENDERS = ("trl_default", "trl_best", "sftune", "sftune_trl1")  # sftune_trl1: trl_default's script, sftune import


# ----------------------------------------------------------------------------- shared set-up


def build_model(path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12,
                        bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(str(path))


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul FLOP/s on this machine (the MFU denominator)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def rows_for(workload: str, n: int) -> list[dict]:
    if workload in ("W1", "W3"):
        rows = json.loads(CODEALPACA.read_text())
        return [{"instruction": r["instruction"], "output": r["output"]} for r in rows if r["output"].strip()][:n]
    rows = [json.loads(line) for line in IMDB.read_text().splitlines()[:n]]
    return [{"text": r["text"]} for r in rows]


HELDOUT = 16  # rows after the training rows, for the final held-out loss


def encode(tok, row: dict) -> tuple[list[int], list[int]]:
    """Prompt ids and completion ids (+EOS), the way every contender builds them."""
    if "text" in row:
        return [], tok(row["text"])["input_ids"] + [tok.eos_token_id]
    return (tok(f"### Question: {row['instruction']}\n ### Answer:")["input_ids"],
            tok(f" {row['output']}")["input_ids"] + [tok.eos_token_id])


def heldout_loss(model, workload: str, rows: list[dict]) -> float:
    """Mean loss per trained token on held-out rows: the same measurement for every contender."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for r in rows:
            p, c = encode(tok, r)
            ids = (p + c)[:MAX_LENGTH]
            labels = ([-100] * len(p) + c)[:MAX_LENGTH]
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            target = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / max(count, 1)


def token_stats(workload: str, rows: list[dict]) -> dict:
    """Real tokens, loss tokens and attention pairs of the epoch, as every contender sees it
    (prompt and completion tokenized separately, EOS appended, truncated at MAX_LENGTH)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    real = loss = pairs = 0
    for r in rows:
        p, c = encode(tok, r)
        n = min(len(p) + len(c), MAX_LENGTH)
        real += n
        loss += max(0, n - max(len(p), 1))
        pairs += n * (n + 1) // 2
    return {"real_tokens": real, "loss_tokens": loss, "attn_pairs": pairs, "examples": len(rows)}


def model_flops(stats: dict, lora: bool) -> tuple[float, str]:
    """Training FLOPs the task needs, identical for every contender."""
    d, layers, vocab = 768, 6, 50257
    n_block = layers * 12 * d * d  # attention (4 d^2) + MLP (8 d^2) weights per layer
    fwd = 2 * n_block * stats["real_tokens"] + 2 * vocab * d * stats["loss_tokens"] \
        + layers * 4 * d * stats["attn_pairs"]
    factor = 2 if lora else 3  # LoRA: no weight gradients for the frozen base (adapters are ~1%)
    formula = (f"FLOPs = {factor} x [2*N_blocks*T_real + 2*V*d*T_loss + 4*L*d*sum(len*(len+1)/2)], "
               f"N_blocks = 12*L*d^2 = {n_block / 1e6:.1f}M, V*d = {vocab * d / 1e6:.1f}M "
               f"({'forward + input gradients (LoRA)' if lora else 'forward + backward'}; lm_head counted on "
               "loss positions only, the work the loss needs)")
    return factor * fwd, formula


# ----------------------------------------------------------------------------- contenders (child processes)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_sftune(workload: str, rows: list[dict], heldout: list[dict], model_dir: str, work: str) -> dict:
    from sftune.config import load_config
    from sftune.training import train
    from sftune.console import read_metrics

    data = Path(work) / "data.jsonl"  # threads: sftune's own choice (sftune.threads)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"model.path": model_dir, "data.path": str(data), "data.max_length": MAX_LENGTH,
            "train.output_dir": str(Path(work) / "out"), "train.epochs": 1, "train.batch_size": BATCH,
            "train.lr": LR, "train.log_every": 1, "train.seed": 0, "eval.exact_match": False}
    if workload in ("W1", "W3"):
        over["data.template"] = "qa"
    else:
        over["data.format"] = "text"
    if workload == "W3":
        over.update({"lora.enabled": True, "lora.r": 16, "lora.alpha": 32, "lora.target_modules": "all-linear"})
    train(load_config(None, over))
    steps = [m for m in read_metrics(Path(work) / "out") if "loss" in m and "step" in m]
    res = {"step_times": [m["time"] for m in steps], "losses": [m["loss"] for m in steps],
           "peak_rss": _peak_rss()}
    if workload == "W3":
        from peft import AutoPeftModelForCausalLM as Auto
    else:
        from transformers import AutoModelForCausalLM as Auto
    res["heldout_loss"] = heldout_loss(Auto.from_pretrained(str(Path(work) / "out")), workload, heldout)
    return res


class _Timer:
    """A TrainerCallback recording the time at every optimizer step and the logged losses."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times, self.losses, self.steps_seen = [], [], False

            def on_step_end(self, args, state, control, **kw):
                self.steps_seen = True
                self.times.append(time.time())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])
                    if not self.steps_seen:  # sftune's SFTTrainer has no on_step_end: logging_steps=1 logs each step
                        self.times.append(time.time())

        return Timer()


def run_trl(workload: str, rows: list[dict], heldout: list[dict], model_dir: str, work: str, best: bool,
            lib: str = "trl") -> dict:
    """A TRL 1.x script; ``lib="sftune"`` runs the same script with ``from sftune import SFTConfig, SFTTrainer``."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if lib == "sftune":
        from sftune import SFTConfig, SFTTrainer
    else:
        from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count() or 2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    if workload in ("W1", "W3"):
        ds = datasets.Dataset.from_list([{"prompt": f"### Question: {r['instruction']}\n ### Answer:",
                                          "completion": f" {r['output']}"} for r in rows])
    else:
        ds = datasets.Dataset.from_list(rows)
    kw = dict(output_dir=str(Path(work) / "out"), num_train_epochs=1, per_device_train_batch_size=BATCH,
              learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no",
              report_to=[], seed=0, bf16=False, fp16=False, max_length=MAX_LENGTH, dataloader_num_workers=0,
              use_cpu=True)
    if best:
        # packed rows of MAX_LENGTH tokens; as many per step as the unpacked contenders' tokens per step
        mean_len = sum(len(encode(tok, r)[0]) + len(encode(tok, r)[1]) for r in rows) / len(rows)
        kw.update(packing=True, packing_strategy="bfd", padding_free=True, gradient_checkpointing=False,
                  per_device_train_batch_size=max(1, round(BATCH * min(mean_len, MAX_LENGTH) / MAX_LENGTH)))
    args = SFTConfig(**kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if workload == "W3":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM", fan_in_fan_out=True)
    timer = _Timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                         callbacks=[timer])
    trainer.train()
    res = {"step_times": timer.times, "losses": timer.losses, "peak_rss": _peak_rss()}
    res["heldout_loss"] = heldout_loss(trainer.model, workload, heldout)
    return res


def child(contender: str, workload: str, rows: list[dict], heldout: list[dict], model_dir: str, queue) -> None:
    try:
        with tempfile.TemporaryDirectory() as work:
            start = time.time()
            if contender == "sftune":
                res = run_sftune(workload, rows, heldout, model_dir, work)
            else:
                res = run_trl(workload, rows, heldout, model_dir, work, best=contender == "trl_best",
                              lib="sftune" if contender == "sftune_trl1" else "trl")
            res["wall"] = time.time() - start
            queue.put(res)
    except Exception as e:  # report, don't hang the parent
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})


def busy_neighbour():
    """A plain Python busy loop pinned to the last CPU this process may use (``--busy``)."""
    import subprocess

    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    code = f"import os\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def measure(contender: str, workload: str, rows: list[dict], heldout: list[dict], model_dir: str, stats: dict,
            busy: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    neighbour = busy_neighbour() if busy else None
    try:
        p = ctx.Process(target=child, args=(contender, workload, rows, heldout, model_dir, queue))
        p.start()
        res = queue.get()
        p.join()
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if "error" in res:
        return res
    times = res["step_times"]
    steps = len(times)
    if steps <= WARMUP_STEPS + 1:
        return {"error": f"only {steps} optimizer steps; use more examples"}
    # throughput after the warm-up steps; tokens are spread evenly over steps in expectation
    elapsed = times[-1] - times[WARMUP_STEPS - 1] if WARMUP_STEPS else times[-1] - times[0]
    tokens = stats["real_tokens"] * (steps - WARMUP_STEPS) / steps
    losses = res["losses"]
    return {"tokens_per_s": tokens / elapsed, "peak_rss_gb": res["peak_rss"] / 2**30, "steps": steps,
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "heldout_loss": res["heldout_loss"], "train_seconds": elapsed, "wall": res["wall"]}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer examples per workload (a smoke run)")
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--examples", type=int, help="examples per workload (default 48, quick 24)")
    parser.add_argument("--busy", action="store_true", help="run each contender beside one busy process")
    parser.add_argument("--out", help="default: bench/results.json (bench/results_busy.json with --busy)")
    args = parser.parse_args(argv)
    args.out = args.out or str(ROOT / "bench" / ("results_busy.json" if args.busy else "results.json"))
    if not TOKENIZER.exists() or not CODEALPACA.exists():
        print(f"needs ../shared (the GPT-2 tokenizer and data) beside the repository: {SHARED} is missing")
        return 2
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    n = args.examples or (24 if args.quick else 48)
    workloads = [w.strip() for w in args.workloads.split(",")]
    contenders = [c.strip() for c in args.contenders.split(",")]
    peak = matmul_flops()
    console.print(f"fp32 matmul peak (2048x2048): {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} cores "
                  f"({platform.processor() or platform.machine()})")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
               "matmul_gflops": peak / 1e9, "examples": n, "busy_neighbour": args.busy, "batch_size": BATCH, "max_length": MAX_LENGTH,
               "workloads": {}}
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "distilgpt2-shaped"
        build_model(model_dir)
        for w in workloads:
            everything = rows_for(w, n + HELDOUT)
            rows, heldout = everything[:n], everything[n:]
            stats = token_stats(w, rows)
            flops, formula = model_flops(stats, lora=w == "W3")
            per = {}
            for c in contenders:
                console.print(f"[bold]{w}[/] {c} …")
                per[c] = measure(c, w, rows, heldout, str(model_dir), stats, busy=args.busy)
                if "error" in per[c]:
                    console.print(f"[red]{c} failed: {per[c]['error']}[/]\n{per[c].get('trace', '')}")
            ok = {c: r for c, r in per.items() if "error" not in r}
            for ours in ("sftune", "sftune_trl1"):
                if ours not in ok:
                    continue
                s = ok[ours]
                s["mfu"] = flops / stats["real_tokens"] * s["tokens_per_s"] / peak
                for c in ("trl_default", "trl_best"):
                    if c in ok:
                        s[f"speed_vs_{c}"] = s["tokens_per_s"] / ok[c]["tokens_per_s"]
                        s[f"mem_vs_{c}"] = s["peak_rss_gb"] / ok[c]["peak_rss_gb"]
            results["workloads"][w] = {"stats": stats, "flops_formula": formula, "results": per}
            t = Table(title=f"{w}: {stats['examples']} examples, {stats['real_tokens']:,} tokens "
                            f"({stats['loss_tokens']:,} with loss), 1 epoch, batch {BATCH}", title_justify="left")
            for col in ("contender", "tokens/s", "peak RSS", "train loss", "held-out loss", "steps", "vs TRL default",
                        "vs TRL best", "MFU"):
                t.add_column(col, justify="right")
            for c, r in per.items():
                if "error" in r:
                    t.add_row(c, "failed", "", "", "", "", "", "", "")
                    continue
                t.add_row(c, f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_gb']:.2f} GB", f"{r['train_loss']:.4f}",
                          f"{r['heldout_loss']:.4f}", str(r["steps"]), f"{r.get('speed_vs_trl_default', float('nan')):.2f}x" if c == "sftune" else "",
                          f"{r.get('speed_vs_trl_best', float('nan')):.2f}x" if c == "sftune" else "",
                          f"{r['mfu']:.2f}" if "mfu" in r else "")
            console.print(t)
            console.print(f"[dim]{formula}[/]")
            if "sftune" in ok:
                s = ok["sftune"]
                summaries.append(f"{w} sftune/trl_default={s.get('speed_vs_trl_default', float('nan')):.2f}x "
                                 f"sftune/trl_best={s.get('speed_vs_trl_best', float('nan')):.2f}x "
                                 f"mem/trl_default={s.get('mem_vs_trl_default', float('nan')):.2f} mfu={s['mfu']:.2f}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.out}")
    print(" | ".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
