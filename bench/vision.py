"""sftune vs TRL's SFTTrainer on a vision-language workload, side by side.

    python bench/vision.py                 # 800 conversations, about 10 minutes on 2 CPU cores
    python bench/vision.py --rows 200      # a smoke run

Every contender trains the same tiny LLaVA-style model (sftune's ``builtin:quickstart-vision``:
a CLIP-like vision tower over 32x32 pictures, 16 image tokens each, a projector and a 4-layer
Llama; initialised from one seed, fp32 on CPU) on the same generated conversations (a picture and
a question; the assistant describes the shape in a sentence), for one epoch, with the same
learning rate and schedule and the same torch thread count (``--threads``), the loss on the
assistant's reply only. Each runs in its own process, so its peak resident memory is its own.

Contenders:
  trl          TRL's SFTTrainer with the processor (prompt/completion conversations + images, its
               vision collator; TRL refuses ``packing`` and ``padding_free`` for image data)
  sftune       sftune, one conversation per row (``data.packing=false``)
  sftune_pack  sftune with packing: several conversations with their images in one row of 512
               tokens, as many tokens per step as the unpacked contenders

Reported: trained tokens/s (non-padding tokens per second, after the first optimizer step), peak
resident memory and the mean training loss. Written to ``bench/vision_results.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
BATCH = 8
LR = 5e-4
PACKED_LENGTH = 512
CONTENDERS = ("trl", "sftune", "sftune_pack")
WHERE = {"circle": "a round", "square": "a square", "triangle": "a three-cornered", "cross": "a cross-shaped"}


def build_model(path: Path) -> None:
    """The quickstart-vision model with seed-0 weights, saved with its processor."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    import sftune

    assets = Path(sftune.__file__).parent / "assets" / "quickstart-vision"
    shutil.copytree(assets, path, dirs_exist_ok=True)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(str(assets))).save_pretrained(str(path))


def make_rows(n: int, work: Path) -> list[dict]:
    """Conversations in TRL's layout, the pictures as PNG files beside the JSONL (paths relative to it)."""
    from sftune.quickstart_vision import make_rows as pictures

    rows = []
    (work / "images").mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(pictures(n, random.Random(0))):
        name = f"images/{i}.png"
        (work / name).write_bytes(r["images"][0])
        reply = (f"The picture shows {WHERE[r['shape']]} {r['colour']} {r['shape']} on a black background"
                 + ", with a few dim grey speckles around it" * (i % 3 == 0) + ".")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]}], "images": [name]})
    return rows


def real_tokens(model_dir: str, rows: list[dict], work: Path) -> int:
    """Tokens of the epoch as every contender sees them: the conversation with its image expanded."""
    from PIL import Image

    from sftune.vision_model import load_processor

    processor = load_processor(model_dir)
    total = 0
    for r in rows:
        text = processor.apply_chat_template(r["messages"], tokenize=False)
        total += len(processor(text=[text], images=[Image.open(work / r["images"][0])])["input_ids"][0])
    return total


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_sftune(model_dir: str, work: Path, packing: bool, mean_len: float, threads: int) -> dict:
    from sftune.config import load_config
    from sftune.console import read_metrics
    from sftune.training import train

    over = {"model.path": model_dir, "data.path": str(work / "data.jsonl"), "train.output_dir": str(work / "out"),
            "train.epochs": 1, "train.lr": LR, "train.log_every": 1, "train.seed": 0, "train.warmup_steps": 0,
            "train.scheduler": "linear", "eval.exact_match": False, "data.packing": packing,
            "train.batch_size": max(1, round(BATCH * mean_len / PACKED_LENGTH)) if packing else BATCH,
            "data.max_length": PACKED_LENGTH if packing else 256, "train.num_threads": threads}
    train(load_config(None, over))
    steps = [m for m in read_metrics(work / "out") if "loss" in m and "step" in m]
    return {"step_times": [m["time"] for m in steps], "losses": [m["loss"] for m in steps], "peak_rss": _peak_rss()}


def run_trl(model_dir: str, work: Path, threads: int) -> dict:
    import datasets
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftune.vision_model import load_processor

    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:],
                                      "images": [Image.open(work / r["images"][0]).convert("RGB")]} for r in rows])
    args = SFTConfig(output_dir=str(work / "out"), num_train_epochs=1, per_device_train_batch_size=BATCH,
                     learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to=[], seed=0, bf16=False, fp16=False, max_length=None,
                     dataloader_num_workers=0, use_cpu=True, gradient_checkpointing=False)
    processor = load_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor, callbacks=[Timer()])
    trainer.train()
    return {"step_times": times, "losses": losses, "peak_rss": _peak_rss()}


def child(contender: str, model_dir: str, work: str, mean_len: float, threads: int, queue) -> None:
    try:
        start = time.time()
        res = run_trl(model_dir, Path(work), threads) if contender == "trl" else \
            run_sftune(model_dir, Path(work), contender == "sftune_pack", mean_len, threads)
        res["wall"] = time.time() - start
        queue.put(res)
    except Exception as e:  # report, don't hang the parent
        import traceback

        queue.put({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]})


def measure(contender: str, model_dir: str, work: Path, tokens: int, mean_len: float, threads: int) -> dict:
    import shutil

    shutil.rmtree(work / "out", ignore_errors=True)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=child, args=(contender, model_dir, str(work), mean_len, threads, queue))
    p.start()
    res = queue.get()
    p.join()
    if "error" in res:
        return res
    times, steps = res["step_times"], len(res["step_times"])
    if steps < 3:
        return {"error": f"only {steps} optimizer steps; use more rows"}
    elapsed = times[-1] - times[0]  # after the first step (warm-up)
    return {"tokens_per_s": tokens * (steps - 1) / steps / elapsed, "peak_rss_gb": res["peak_rss"] / 2**30,
            "steps": steps, "train_loss": sum(res["losses"]) / max(len(res["losses"]), 1),
            "train_seconds": elapsed, "wall": res["wall"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads, the same for every contender (default: the CPU count)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "vision_results.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = str(work / "model")
        build_model(Path(model_dir))
        rows = make_rows(args.rows, work)
        (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tokens = real_tokens(model_dir, rows, work)
        results = {"rows": len(rows), "real_tokens": tokens, "batch": BATCH, "lr": LR, "threads": args.threads,
                   "results": {}}
        for contender in args.contenders.split(","):
            res = measure(contender, model_dir, work, tokens, tokens / len(rows), args.threads)
            results["results"][contender] = res
            print(contender, json.dumps(res), flush=True)
    table = results["results"]
    print(f"\n{'contender':<12} {'tokens/s':>10} {'peak RSS GiB':>13} {'steps':>6} {'train loss':>11}")
    for name, r in table.items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        print(f"{name:<12} {r['tokens_per_s']:>10.0f} {r['peak_rss_gb']:>13.2f} {r['steps']:>6} {r['train_loss']:>11.4f}")
    trl = table.get("trl", {})
    for name in ("sftune", "sftune_pack"):
        r = table.get(name, {})
        if "tokens_per_s" in r and "tokens_per_s" in trl:
            print(f"{name}: {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x TRL's tokens/s, "
                  f"{r['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x its peak memory")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
