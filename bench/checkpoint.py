"""What the checkpoint digests cost: one save with and without them, on the benchmark-size model.

    python bench/checkpoint.py                  # 3 saves each way, interleaved (a minute or two on 2 cores)
    python bench/checkpoint.py --repeats 5 --out bench/checkpoint_results.json

The model is GPT-2 shaped (``GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6,
n_head=12)``: 81.9M parameters, fp32) with AdamW state (one optimizer step taken, so both moments
exist) and a registered LR scheduler: exactly what ``sftune.checkpoint.save_checkpoint`` writes for
such a run (about 1 GB: weights, optimizer, scheduler, RNG, ``trainer_state.json``). Each save goes
to a fresh directory (``--dir``, default a temporary one). Three ways:

  without digests       ``digests=False``: no manifest (what sftune did before)
  digests, in the save  ``background=False``: hashed and the manifest written before the save returns
  digests, background   sftune's default: the save returns once the files are written; a thread
                        hashes, writes the manifest and renames the checkpoint into place while
                        training goes on ("background: in place" is when that is done)

Timed: how long ``save_checkpoint`` blocks the caller (the training loop). Also reported:
``sftune.digests.check_dir`` on the checkpoint (what a resume verifies), and the raw SHA-256 and
BLAKE2b rates of this CPU. The modes alternate order every repeat so all see the same machine
load; the table gives the median and the range.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def hash_rate(name: str, mb: int = 256) -> float:
    data = os.urandom(mb << 20)
    h, view, t = hashlib.new(name), memoryview(data), time.perf_counter()
    for i in range(0, len(data), 4 << 20):
        h.update(view[i:i + (4 << 20)])
    return len(data) / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler

    from sftune.checkpoint import save_checkpoint, wait_for_saves
    from sftune.digests import check_dir

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=6, n_head=12))
    params = sum(p.numel() for p in model.parameters())
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=100)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    x = torch.randint(0, 50257, (1, 64))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

    root = Path(args.dir or tempfile.mkdtemp(prefix="sftune-bench-ckpt-"))
    modes = {"without digests": (False, False), "digests, in the save": (True, False),
             "digests, background": (True, True)}
    times: dict[str, list[float]] = {k: [] for k in modes}
    verify, in_place, size = [], [], 0
    for i in range(args.repeats):
        for name in list(modes) if i % 2 == 0 else list(modes)[::-1]:
            digests, background = modes[name]
            out = root / f"run-{i}-{name.replace(' ', '_').replace(',', '')}"
            t = time.perf_counter()
            path = save_checkpoint(acc, out, 10, {"world_size": 1}, keep=1, digests=digests, background=background)
            times[name].append(time.perf_counter() - t)  # what the training loop waits for
            if background:
                wait_for_saves()
                in_place.append(time.perf_counter() - t)  # the checkpoint listed, its manifest written
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            if digests:
                t = time.perf_counter()
                assert check_dir(path).status == "intact"
                verify.append(time.perf_counter() - t)
            shutil.rmtree(out)
    res = {"params": params, "checkpoint_bytes": size, "repeats": args.repeats, "cpu": platform.processor(),
           "cores": os.cpu_count(), "sha256_GBps": round(hash_rate("sha256"), 2),
           "blake2b_GBps": round(hash_rate("blake2b"), 2)}
    for k, v in [*times.items(), ("background: in place", in_place), ("verify (check_dir)", verify)]:
        res[k] = {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "max_s": round(max(v), 3)}
    wo = res["without digests"]["median_s"]
    for k in ("digests, in the save", "digests, background"):
        w = res[k]["median_s"]
        res[f"overhead: {k}"] = f"{w - wo:+.3f} s ({100 * (w - wo) / wo:+.1f}%)"
    print(f"model: {params / 1e6:.1f}M parameters, fp32, AdamW state; checkpoint {size / 1e9:.2f} GB "
          f"({args.repeats} saves each way, interleaved)")
    for k in (*modes, "background: in place", "verify (check_dir)"):
        r = res[k]
        print(f"  {k:22s} median {r['median_s']:.3f} s  (range {r['min_s']:.3f} - {r['max_s']:.3f})")
    for k in ("digests, in the save", "digests, background"):
        print(f"  overhead, {k:12s} {res[f'overhead: {k}']} (the time a save blocks training)")
    print(f"  hash rates: sha256 {res['sha256_GBps']} GB/s, blake2b {res['blake2b_GBps']} GB/s")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
