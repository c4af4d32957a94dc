"""Does distillation help? The offline quickstart, a smaller student, the same steps with and without a teacher.

1. The teacher: ``sftune train quickstart`` (the recipe as shipped; reused when ``--teacher`` exists).
2. The student: the quickstart GPT-2 at a quarter of the width and half the depth (from scratch).
3. The student trains ``--steps`` steps twice, plain SFT and distilled from the teacher
   (``distill.teacher=<teacher> distill.alpha=...``), same data order, seed and schedule; held-out exact
   match (200 unseen words) is printed side by side and written to ``distill_quickstart_results.json``.

    python bench/distill_quickstart.py --steps 600
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "sftune" / "assets" / "quickstart"


def sftune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sftune", *args], check=True)


def student_dir(out: Path, n_layer: int, n_embd: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ASSET / "config.json").read_text())
    cfg.update(n_layer=n_layer, n_embd=n_embd, n_head=2)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET / name, out / name)
    return out


def exact_match(run: Path) -> dict:
    m = json.loads((run / "final_metrics.json").read_text())
    return {k: m.get(k) for k in ("exact_match_before", "exact_match_after", "contains_match_after", "eval_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/distill_quickstart")
    ap.add_argument("--teacher", default=None, help="a trained quickstart run (default: train one in --work)")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    args = ap.parse_args()
    work = Path(args.work)
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    times = {}
    if not (teacher / "final_metrics.json").exists():
        t = time.time()
        sftune("train", "quickstart", f"train.output_dir={teacher}", f"train.max_steps={args.teacher_steps}",
               "eval.samples=0")
        times["teacher_s"] = round(time.time() - t, 1)
    student = student_dir(work / "student_config", args.n_layer, args.n_embd)
    common = [f"model.path={student}", "model.from_scratch=true", f"train.max_steps={args.steps}", "eval.samples=0",
              f"train.warmup_steps={min(50, args.steps // 10)}"]
    runs = {"sft": work / "student_sft", "distill": work / "student_distill"}
    t = time.time()
    sftune("train", "quickstart", *common, f"train.output_dir={runs['sft']}")
    times["sft_s"] = round(time.time() - t, 1)
    t = time.time()
    sftune("train", "quickstart", *common, f"train.output_dir={runs['distill']}", f"distill.teacher={teacher}",
           f"distill.alpha={args.alpha}", f"distill.temperature={args.temperature}")
    times["distill_s"] = round(time.time() - t, 1)
    result = {"teacher": {"run": str(teacher), **exact_match(teacher)},
              "student": {"n_layer": args.n_layer, "n_embd": args.n_embd, "steps": args.steps},
              "sft": exact_match(runs["sft"]),
              "distill": {"alpha": args.alpha, "temperature": args.temperature, **exact_match(runs["distill"])},
              "seconds": times}
    print(f"held-out exact match after {args.steps} steps (student {args.n_layer} layers x {args.n_embd}): "
          f"plain SFT {100 * result['sft']['exact_match_after']:.1f}%  |  distilled (alpha {args.alpha}) "
          f"{100 * result['distill']['exact_match_after']:.1f}%  |  teacher "
          f"{100 * result['teacher']['exact_match_after']:.1f}%")
    (Path(__file__).parent / "distill_quickstart_results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
