"""Does distillation help? The offline quickstart, a smaller student, the same steps with and without a teacher.

1. The teacher: ``sftune train quickstart`` (the recipe as shipped, 4 layers x 128; reused when
   ``--teacher`` exists), trained on ``--teacher-data``.
2. The student: ``builtin:quickstart-small``, the quickstart GPT-2 at half the depth with two heads
   (2 layers x 128), from scratch.
3. For each student data set (``--data``) and each step budget (``--steps``) the student trains twice,
   plain SFT and distilled from the teacher (``distill.teacher=<teacher> distill.alpha=...``), with
   the same data, data order, seed and schedule; held-out exact match (200 unseen words, always
   clean) is printed side by side and written to ``bench/distill_quickstart_results.json``.

The data sets: ``builtin:quickstart`` (deterministic tasks: the teacher's distribution is nearly the
data's one-hot token, so there is little to add) and ``builtin:quickstart-noisy`` (the same with one
training answer in five wrong, as real data has mistakes: the teacher's distribution says what the
right answer is where the data's token is wrong).

    python bench/distill_quickstart.py                                  # clean and noisy, 500 and 1000 steps
    python bench/distill_quickstart.py --teacher-data builtin:quickstart-noisy --teacher runs/teacher-noisy
    python bench/distill_quickstart.py --steps 500 --on-policy 0.5       # on-policy distillation (GKD's lmbda)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "distill_quickstart_results.json"


def sftune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sftune", *args], check=True)


def exact_match(run: Path) -> dict:
    m = json.loads((run / "final_metrics.json").read_text())
    return {k: m.get(k) for k in ("exact_match_after", "eval_loss")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="runs/distill_quickstart")
    ap.add_argument("--teacher", default=None, help="a trained quickstart run (default: train one in --work)")
    ap.add_argument("--teacher-data", default="builtin:quickstart")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--data", nargs="+", default=["builtin:quickstart", "builtin:quickstart-noisy"])
    ap.add_argument("--steps", type=int, nargs="+", default=[500, 1000])
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--on-policy", type=float, default=0.0, help="distill.on_policy of the distilled run (0: off)")
    ap.add_argument("--student", default="builtin:quickstart-small", help="the student's model (from scratch)")
    args = ap.parse_args()
    work = Path(args.work)
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not (teacher / "final_metrics.json").exists():
        sftune("train", "quickstart", f"data.path={args.teacher_data}", f"train.output_dir={teacher}",
               f"train.max_steps={args.teacher_steps}", "eval.samples=0")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    lines = []
    for data in args.data:
        for steps in args.steps:
            common = [f"model.path={args.student}", "model.from_scratch=true", f"data.path={data}",
                      f"train.max_steps={steps}", "eval.samples=0", f"train.warmup_steps={min(50, steps // 10)}"]
            row = {"data": data, "steps": steps, "teacher": {"run": str(teacher), "data": args.teacher_data,
                                                               **exact_match(teacher)},
                   "student": args.student,
                   "alpha": args.alpha, "temperature": args.temperature, "on_policy": args.on_policy}
            policy = [f"distill.on_policy={args.on_policy}", "distill.max_new_tokens=16"] if args.on_policy else []
            for name, extra in (("sft", []), ("distill", [f"distill.teacher={teacher}", f"distill.alpha={args.alpha}",
                                                          f"distill.temperature={args.temperature}", *policy])):
                tag = f"_onpolicy{args.on_policy}" if policy and name == "distill" else ""
                out = work / f"{data.split(':')[-1]}_{steps}_{name}{tag}"
                t = time.time()
                sftune("train", "quickstart", *common, *extra, f"train.output_dir={out}")
                row[name] = {**exact_match(out), "seconds": round(time.time() - t, 1)}
            key = (f"{data}, {steps} steps, student {args.student}, alpha {args.alpha}, "
                   f"T {args.temperature}, teacher on {args.teacher_data}"
                   + (f", on-policy {args.on_policy}" if args.on_policy else ""))
            results[key] = row
            lines.append(f"{data:26} {steps:5} steps: plain SFT {100 * row['sft']['exact_match_after']:5.1f}%  |  "
                         f"distilled {100 * row['distill']['exact_match_after']:5.1f}%")
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"held-out exact match, student {args.student} (teacher "
          f"{100 * exact_match(teacher)['exact_match_after']:.1f}%, trained on {args.teacher_data}):")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
