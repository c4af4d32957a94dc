"""sftune vs TRL on one GPU, side by side in one run: speed, peak memory, MFU, final loss.

    pip install -e ".[bench,gpu]"        # TRL, liger-kernel, bitsandbytes (+ flash-attn if it builds)
    python bench/gpu.py                  # both models, CodeAlpaca, max_length 2048 (on a GPU)
    python bench/gpu.py --models llama-1b --data alpaca --examples 2000
    python bench/gpu.py --smoke          # tiny shapes on CPU for a few steps: checks the script

Models: Qwen3-0.6B- and Llama-3.2-1B-shaped, initialised at random from transformers configs (no
download; the vocabulary is the GPT-2 tokenizer's 50,257, so the lm_head is smaller than the real
models'), saved once in fp32 and loaded by every contender. Data: CodeAlpaca or Alpaca from
../shared, "### Question: …\\n ### Answer: …", loss on the answer (+EOS) only, max_length 2048.

Contenders, each in its own process (its peak memory is its own), same examples, one epoch, same
tokens per optimizer step (``--rows`` packed rows of max_length), same learning rate:
  trl        TRL SFTTrainer with its defaults on a GPU: bf16, packing (best-fit decreasing),
             padding-free, flash_attention_2 when flash_attn is installed (else sdpa), its default
             gradient checkpointing (``--trl-gc off`` turns it off)
  trl_liger  the same with use_liger_kernel=True
  sftune     sftune with its defaults (bf16 on the GPU, flat rows, the attention kernel its start-up
             line names, gradient_checkpointing=auto)

Reported: trained tokens/s (non-padding tokens per second, after the warm-up steps), peak GPU
memory (torch.cuda.max_memory_allocated; peak RSS on CPU), MFU against the dense bf16 matmul peak
measured at the start of the same run (fp32 on CPU), and the final training loss (mean of the last
10% of steps). A table is printed and JSON written (``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = {"codealpaca": SHARED / "data" / "codealpaca_2k.json", "alpaca": SHARED / "data" / "alpaca_5000.json"}
CONTENDERS = ("trl", "trl_liger", "sftune")
LR = 2e-5
WARMUP_STEPS = 2


def model_config(name: str, vocab: int, smoke: bool):
    from transformers import LlamaConfig, Qwen3Config

    if smoke:
        tiny = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
        return Qwen3Config(**tiny, head_dim=16) if name == "qwen3-0.6b" else LlamaConfig(**tiny)
    if name == "qwen3-0.6b":  # Qwen/Qwen3-0.6B's config.json
        return Qwen3Config(vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                           rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if name == "llama-1b":  # meta-llama/Llama-3.2-1B's config.json (rope scaling left out: no effect at 2048)
        return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                           rope_theta=500_000, rms_norm_eps=1e-5, tie_word_embeddings=True)
    raise SystemExit(f"unknown model {name}: qwen3-0.6b or llama-1b")


def build_model(name: str, tokenizer: Path, path: Path, smoke: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    cfg = model_config(name, len(tok), smoke)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = tok.eos_token_id
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return cfg.to_dict()


def rows_for(data: str, n: int) -> list[dict]:
    rows = json.loads(DATA[data].read_text())
    out = []
    for r in rows:
        instr = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
        if r["output"].strip():
            out.append({"instruction": instr, "output": r["output"]})
    return out[:n]


def token_stats(tokenizer: Path, rows: list[dict], max_length: int) -> dict:
    """Real tokens, loss tokens and attention pairs of the epoch (prompt and completion tokenized
    separately, EOS appended, truncated at max_length), the same for every contender."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    real = loss = pairs = 0
    for r in rows:
        p = tok(f"### Question: {r['instruction']}\n ### Answer:")["input_ids"]
        c = tok(f" {r['output']}")["input_ids"] + [tok.eos_token_id]
        n = min(len(p) + len(c), max_length)
        real, loss, pairs = real + n, loss + max(0, n - len(p)), pairs + n * (n + 1) // 2
    return {"real_tokens": real, "loss_tokens": loss, "attn_pairs": pairs, "examples": len(rows)}


def task_flops(cfg: dict, stats: dict) -> tuple[float, str]:
    """Training FLOPs of the epoch: 3 x forward; matmul weights of the blocks on every token, the
    lm_head on loss positions only (the work the loss needs), causal attention per example."""
    d, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv, ff = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // heads
    n_block = layers * (d * hd * (2 * heads + 2 * kv) + 3 * d * ff)
    fwd = 2 * n_block * stats["real_tokens"] + 2 * vocab * d * stats["loss_tokens"] \
        + layers * 4 * heads * hd * stats["attn_pairs"]
    formula = (f"FLOPs = 3 x [2*N_blocks*T_real + 2*V*d*T_loss + 4*L*H*hd*sum(len*(len+1)/2)], "
               f"N_blocks = {n_block / 1e6:.0f}M, V*d = {vocab * d / 1e6:.1f}M")
    return 3 * fwd, formula


def matmul_peak(device: str, n: int = 8192, reps: int = 20) -> float:
    """Dense matmul FLOP/s measured now: bf16 on CUDA, fp32 (2048) on CPU."""
    import torch

    if device != "cuda":
        n, reps = 2048, 5
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- contenders (child processes)


def _peak(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_sftune(a: dict, work: str) -> dict:
    from sftune.config import load_config
    from sftune.training import train
    from sftune.console import read_metrics

    data = Path(work) / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in a["rows"]))
    over = {"model.path": a["model_dir"], "data.path": str(data), "data.template": "qa",
            "data.max_length": a["max_length"], "data.packing": True, "train.output_dir": str(Path(work) / "out"),
            "train.epochs": 1, "train.batch_size": a["rows_per_step"], "train.lr": LR, "train.log_every": 1,
            "train.seed": 0, "train.save_every": None, "eval.exact_match": False}
    train(load_config(None, over))
    steps = [m for m in read_metrics(Path(work) / "out") if "loss" in m and "step" in m]
    return {"step_times": [m["time"] for m in steps], "losses": [m["loss"] for m in steps],
            "peak_gib": max([m.get("peak_mem_gib", 0) for m in steps] + [_peak(a["device"])])}


def run_trl(a: dict, work: str, liger: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses = [], []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    cuda = a["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(a["model_dir"])
    tok.pad_token = tok.eos_token
    ds = datasets.Dataset.from_list([{"prompt": f"### Question: {r['instruction']}\n ### Answer:",
                                      "completion": f" {r['output']}"} for r in a["rows"]])
    attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    kw = dict(output_dir=str(Path(work) / "out"), num_train_epochs=1, per_device_train_batch_size=a["rows_per_step"],
              learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no",
              report_to=[], seed=0, bf16=cuda, max_length=a["max_length"], packing=True, packing_strategy="bfd",
              padding_free=True, dataloader_num_workers=0, use_cpu=not cuda, use_liger_kernel=liger)
    if a["trl_gc"] == "off":
        kw["gradient_checkpointing"] = False
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype=torch.float32, attn_implementation=attn)
    timer = Timer()
    trainer = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_times": timer.times, "losses": timer.losses, "peak_gib": _peak(a["device"]), "attention": attn,
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}


def child(contender: str, a: dict, queue) -> None:
    try:
        import torch

        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as work:
            start = time.time()
            res = run_sftune(a, work) if contender == "sftune" else run_trl(a, work, liger=contender == "trl_liger")
            res["wall"] = time.time() - start
            queue.put(res)
    except Exception as e:  # report, don't hang the parent
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})


def measure(contender: str, a: dict, stats: dict, flops: float, peak: float) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(contender, a, queue))
    p.start()
    res = queue.get()
    p.join()
    if "error" in res:
        return res
    times, losses = res.pop("step_times"), res.pop("losses")
    steps, warm = len(times), min(WARMUP_STEPS, max(len(times) - 2, 0))
    if steps < 2:
        return {"error": f"only {steps} optimizer steps; use more examples"}
    elapsed = times[-1] - times[warm - 1] if warm else times[-1] - times[0]
    frac = (steps - warm) / steps if warm else (steps - 1) / steps
    tps = stats["real_tokens"] * frac / elapsed
    tail = losses[-max(1, len(losses) // 10):]
    return {**res, "tokens_per_s": tps, "steps": steps, "final_loss": sum(tail) / len(tail) if tail else float("nan"),
            "mfu": flops / stats["real_tokens"] * tps / peak, "train_seconds": elapsed}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen3-0.6b,llama-1b")
    parser.add_argument("--data", default="codealpaca", choices=sorted(DATA))
    parser.add_argument("--examples", type=int, help="training examples (default 2000; smoke 24)")
    parser.add_argument("--max-length", type=int, help="default 2048 (smoke 128)")
    parser.add_argument("--rows", type=int, help="packed rows of max_length per optimizer step (default 8; smoke 2)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--tokenizer", default=str(SHARED / "models" / "gpt2-tokenizer"))
    parser.add_argument("--trl-gc", choices=("default", "off"), default="default",
                        help="TRL's gradient checkpointing: its default, or off")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU for a few steps (checks the script)")
    parser.add_argument("--out", help="JSON results (default bench/gpu_results.json; smoke: a temporary file)")
    args = parser.parse_args(argv)
    import torch

    if not Path(args.tokenizer).exists() or not DATA[args.data].exists():
        print(f"needs the GPT-2 tokenizer ({args.tokenizer}) and {DATA[args.data]}")
        return 2
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        print("no CUDA GPU here: bench/gpu.py measures GPUs (use --smoke to check the script on a CPU)")
        return 2
    n = args.examples or (24 if args.smoke else 2000)
    max_length = args.max_length or (128 if args.smoke else 2048)
    rows_per_step = args.rows or (2 if args.smoke else 8)
    contenders = [c.strip() for c in args.contenders.split(",")]
    skipped = {}
    if importlib.util.find_spec("trl") is None:
        skipped.update({c: "trl is not installed" for c in contenders if c.startswith("trl")})
    if "trl_liger" in contenders and (device != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        skipped.setdefault("trl_liger", "liger-kernel needs CUDA" if device != "cuda" else "liger-kernel is not installed")
    peak = matmul_peak(device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    print(f"{gpu}: dense {'bf16' if device == 'cuda' else 'fp32'} matmul peak {peak / 1e12:.1f} TFLOP/s (measured)")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "sftune_gpu_smoke.json" if args.smoke
                                           else ROOT / "bench" / "gpu_results.json")
    results = {"date": time.strftime("%Y-%m-%d"), "device": gpu, "matmul_peak_tflops": peak / 1e12, "data": args.data,
               "examples": n, "max_length": max_length, "rows_per_step": rows_per_step, "smoke": args.smoke,
               "flash_attn": importlib.util.find_spec("flash_attn") is not None, "models": {}}
    rows = rows_for(args.data, n)
    stats = token_stats(Path(args.tokenizer), rows, max_length)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",")]:
            model_dir = Path(tmp) / name
            cfg = build_model(name, Path(args.tokenizer), model_dir, args.smoke)
            flops, formula = task_flops(cfg, stats)
            a = {"model_dir": str(model_dir), "rows": rows, "max_length": max_length, "rows_per_step": rows_per_step,
                 "device": device, "trl_gc": args.trl_gc}
            per = {}
            for c in contenders:
                if c in skipped:
                    per[c] = {"skipped": skipped[c]}
                    continue
                print(f"{name}: {c} ...", flush=True)
                per[c] = measure(c, a, stats, flops, peak)
                if "error" in per[c]:
                    print(f"{c} failed: {per[c]['error']}\n{per[c].get('trace', '')}")
            s, base = per.get("sftune", {}), per.get("trl_liger", {})
            if "tokens_per_s" in s and "tokens_per_s" in base:
                s["speed_vs_trl_liger"] = s["tokens_per_s"] / base["tokens_per_s"]
                s["mem_vs_trl_liger"] = s["peak_gib"] / base["peak_gib"]
            results["models"][name] = {"stats": stats, "flops_formula": formula, "results": per}
            lines.append(f"\n{name} ({stats['examples']} examples, {stats['real_tokens']:,} tokens, "
                         f"{stats['loss_tokens']:,} with loss; {formula})")
            lines.append(f"{'contender':<10} {'tokens/s':>10} {'peak GiB':>9} {'MFU':>6} {'final loss':>10} {'steps':>6}")
            for c, r in per.items():
                if "tokens_per_s" in r:
                    lines.append(f"{c:<10} {r['tokens_per_s']:>10,.0f} {r['peak_gib']:>9.2f} {100 * r['mfu']:>5.1f}% "
                                 f"{r['final_loss']:>10.4f} {r['steps']:>6}")
                else:
                    lines.append(f"{c:<10} {r.get('skipped') or 'failed: ' + r.get('error', '?')}")
    out.write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    print(f"wrote {out}")
    return 1 if any("error" in r for m in results["models"].values() for r in m["results"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
