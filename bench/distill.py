"""Distillation speed and memory: sftune live and saved vs TRL's experimental GKDTrainer (lmbda=0).

Every contender trains the same student (GPT-2 shaped, 2 layers x 256, the real GPT-2 vocabulary of
50,257) from the same teacher (4 layers x 384), forward KL at temperature 1 (TRL: beta=0), on the
same CodeAlpaca examples (loss on the answers), 8 examples per step, in its own process (so its peak
memory is its own). Plain SFT of the student (sftune) is the memory baseline: the goal is
live distillation within 1.2x of plain SFT plus the teacher's weights, and faster than TRL.

    python bench/distill.py            # writes bench/distill_results.json (needs ../shared)
    python bench/distill.py --steps 4  # shorter

Tokens/s: all tokens of the steps after the first (which carries the warm-up), over their time.
Peak memory: the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONTENDERS = ("sft", "live", "saved", "trl_gkd")


def build(work: Path, n: int, max_length: int) -> dict:
    """The student, the teacher and the data (JSONL rows for sftune, pre-tokenized rows for TRL)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
    tok.pad_token = tok.eos_token
    paths = {}
    for name, (layers, width) in {"student": (2, 256), "teacher": (4, 384)}.items():
        torch.manual_seed(0 if name == "student" else 1)
        cfg = GPT2Config(vocab_size=len(tok), n_positions=max_length, n_embd=width, n_layer=layers,
                         n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        path = work / name
        GPT2LMHeadModel(cfg).save_pretrained(str(path))
        tok.save_pretrained(str(path))
        paths[name] = str(path)
    rows = json.loads((SHARED / "data" / "codealpaca_2k.json").read_text())[:n]
    pc, tokenized = [], []
    for r in rows:
        prompt, completion = f"### Question: {r['instruction']}\n ### Answer:", f" {r['output']}"
        p_ids = tok(prompt)["input_ids"]
        ids = (p_ids + tok(completion)["input_ids"] + [tok.eos_token_id])[:max_length]
        pc.append({"prompt": prompt, "completion": completion})
        tokenized.append({"input_ids": ids, "completion_mask": [0] * len(p_ids) + [1] * (len(ids) - len(p_ids)),
                          "prompt": prompt})
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pc))
    (work / "tokenized.json").write_text(json.dumps(tokenized))
    paths.update(rows=str(work / "rows.jsonl"), tokenized=str(work / "tokenized.json"),
                 tokens=sum(len(t["input_ids"]) for t in tokenized))
    return paths


def peak_memory() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def sftune_args(p: dict, steps: int, max_length: int, out: Path) -> list[str]:
    return [f"model.path={p['student']}", f"data.path={p['rows']}", f"data.max_length={max_length}",
            f"train.output_dir={out}", f"train.max_steps={steps}", "train.batch_size=8", "train.log_every=1",
            "train.lr=5e-5", "eval.samples=0", "model.check=off"]


def run_sftune(which: str, p: dict, steps: int, max_length: int, work: Path) -> dict:
    from sftune.config import load_config
    from sftune.training import train

    args = sftune_args(p, steps, max_length, work / f"out_{which}")
    if which == "live":
        args.append(f"distill.teacher={p['teacher']}")
    if which == "saved":
        args += [f"distill.saved={work / 'topk'}", "distill.top_k=64"]
    train(load_config(None, args))
    recs = [json.loads(l) for l in (work / f"out_{which}" / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in recs if "loss" in r and "time" in r}
    last = max(times)
    return {"seconds_after_step1": times[last] - times[1], "steps": last,
            "teacher_s_per_step": next((r.get("teacher_s_per_step") for r in recs if "teacher_s_per_step" in r), None)}


def run_trl(p: dict, steps: int, max_length: int, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    ends = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends[state.global_step] = time.time()

    tok = AutoTokenizer.from_pretrained(p["student"])
    tok.pad_token = tok.eos_token
    args = GKDConfig(output_dir=str(work / "out_trl"), max_steps=steps, per_device_train_batch_size=8,
                     learning_rate=5e-5, logging_steps=1, lmbda=0.0, beta=0.0, report_to="none", save_strategy="no",
                     use_cpu=not __import__("torch").cuda.is_available(), bf16=False, seed=0, max_length=max_length)
    trainer = GKDTrainer(model=p["student"], teacher_model=p["teacher"], args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(json.loads(Path(p["tokenized"]).read_text())),
                         callbacks=[Clock()])
    trainer.train()
    return {"seconds_after_step1": ends[max(ends)] - ends[1], "steps": max(ends)}


def child(which: str, p: dict, steps: int, max_length: int, work: Path) -> None:
    if which == "prepare":
        from sftune.config import load_config
        from sftune.distill.saved import prepare_saved

        args = sftune_args(p, steps, max_length, work / "unused") + [f"distill.teacher={p['teacher']}"]
        prepare_saved(load_config(None, args), str(work / "topk"))
        return
    out = run_trl(p, steps, max_length, work) if which == "trl_gkd" else run_sftune(which, p, steps, max_length, work)
    out["peak_gib"] = round(peak_memory(), 3)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        p = json.loads((Path(args.work) / "paths.json").read_text())
        child(args.child, p, args.steps, args.max_length, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="sftune-distill-bench-"))
    n = 8 * args.steps
    p = build(work, n, args.max_length)
    (work / "paths.json").write_text(json.dumps(p))
    results = {"tokens": p["tokens"], "examples": n, "steps": args.steps}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if "saved" in args.contenders:  # the teacher's one pass (its own process; not part of the saved run's memory)
        t = time.time()
        subprocess.run([sys.executable, __file__, "--child", "prepare", "--work", str(work), "--steps",
                        str(args.steps), "--max-length", str(args.max_length)], check=True, env=env,
                       capture_output=True)
        results["prepare_s"] = round(time.time() - t, 1)
    for which in args.contenders.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", which, "--work", str(work), "--steps",
                               str(args.steps), "--max-length", str(args.max_length)],
                              capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{which} failed")
        r = json.loads(line[len("RESULT "):])
        r["tokens_per_s"] = round(p["tokens"] * (r["steps"] - 1) / r["steps"] / r["seconds_after_step1"], 1)
        results[which] = r
        print(which, r, flush=True)
    (Path(__file__).parent / "distill_results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
