"""The quickstart alone and beside a busy process: how the CPU thread count holds up.

    python bench/busy.py                          # auto, 1 and 2 threads; alone and busy; 2 rounds
    python bench/busy.py --threads auto --rounds 3 --steps 400
    python bench/busy.py --threads auto,1,2 --budget 60

Each run is ``sftune train quickstart`` (no exact-match generation: training only) in its own
process, ``--steps`` optimizer steps or ``--budget`` seconds of training, whichever comes first
(the rate is measured on the steps done). "busy" runs start one neighbour first: a plain Python
busy loop pinned to the last CPU this process may use, the situation of a laptop with a browser
or a CI box running a test beside the job. ``auto`` leaves ``train.num_threads`` unset (sftune
picks, see ``sftune/threads.py``); a number pins it. Rounds interleave the cells, so a change in the
machine's load (other users) spreads over all of them.

Reported per cell: trained tokens/s over the logged windows after the first (min-max over rounds),
the thread line sftune printed, and the largest difference of the logged losses from the first
cell's (the same data order and seed, so only thread-count rounding separates them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_neighbour() -> subprocess.Popen:
    cpu = max(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def read_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in r and "tokens_per_s" in r and not r.get("final"):
            recs.append(r)
    return recs


def rate(records: list[dict]) -> float:
    """Time-weighted trained tokens/s over the log windows after the first (the warm-up)."""
    tokens = seconds = 0.0
    for prev, cur in zip(records, records[1:]):
        dt = cur["time"] - prev["time"]
        tokens += cur["tokens_per_s"] * dt
        seconds += dt
    return tokens / seconds if seconds > 0 else float("nan")


def run_one(threads: str, busy: bool, steps: int, budget: float, work: Path) -> dict:
    out = work / f"qs-{threads}-{'busy' if busy else 'alone'}-{time.time_ns()}"
    cmd = [sys.executable, "-m", "sftune", "train", "quickstart", f"train.max_steps={steps}",
           f"train.output_dir={out}", "eval.exact_match=false", "eval.samples=0", "train.log_every=10"]
    if threads != "auto":
        cmd.append(f"train.num_threads={threads}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    neighbour = start_neighbour() if busy else None
    log = out.with_suffix(".log")
    try:
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            start = time.time()
            while p.poll() is None:
                time.sleep(0.5)
                recs = read_records(out)
                if recs and time.time() - start > 20 and recs[-1]["time"] - recs[0]["time"] > budget:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    break
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    recs = read_records(out)
    text = log.read_text()
    line = next((ln for ln in text.splitlines() if ln.startswith("cpu threads:")), "")
    return {"threads": threads, "busy": busy, "tokens_per_s": rate(recs), "steps": recs[-1]["step"] if recs else 0,
            "losses": {r["step"]: r["loss"] for r in recs}, "line": line}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="auto,1,2", help="comma-separated: auto and/or numbers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--budget", type=float, default=45.0, help="seconds of training per run at most")
    parser.add_argument("--out", default=str(ROOT / "bench" / "busy_results.json"))
    args = parser.parse_args(argv)
    cells = [(t.strip(), busy) for t in args.threads.split(",") for busy in (False, True)]
    results: dict[str, list[dict]] = {f"{t} {'busy' if b else 'alone'}": [] for t, b in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for t, busy in cells:
                res = run_one(t, busy, args.steps, args.budget, Path(tmp))
                key = f"{t} {'busy' if busy else 'alone'}"
                results[key].append(res)
                print(f"round {r + 1} {key:>10}: {res['tokens_per_s']:8,.0f} tokens/s, {res['steps']} steps, "
                      f"load {os.getloadavg()[0]:.1f}  {res['line']}", flush=True)
    ref = next(iter(results.values()))[0]["losses"]
    summary = {}
    print(f"\n{'threads':>8} {'alone tokens/s':>18} {'busy tokens/s':>18} {'busy/alone':>11} {'loss diff':>10}")
    for t in dict.fromkeys(t for t, _ in cells):
        alone, busy = results[f"{t} alone"], results[f"{t} busy"]
        a = [x["tokens_per_s"] for x in alone]
        b = [x["tokens_per_s"] for x in busy]
        diff = max((abs(x["losses"][s] - ref[s]) for x in alone + busy for s in x["losses"] if s in ref), default=0.0)
        ratio = sorted(b)[len(b) // 2] / sorted(a)[len(a) // 2]
        summary[t] = {"alone": a, "busy": b, "busy_over_alone_median": ratio, "max_loss_diff": diff,
                      "lines": [x["line"] for x in alone + busy]}
        print(f"{t:>8} {min(a):8,.0f}-{max(a):<8,.0f} {min(b):8,.0f}-{max(b):<8,.0f} {ratio:10.2f}x {diff:10.2e}")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps,
                                          "rounds": args.rounds, "cells": summary}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
