"""Run directories for the dashboard tests, written the way ``sftune train`` writes them, without training."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def fake_run(root: Path, name: str, *, steps: int = 10, final: bool = True, checkpoint: bool = False,
             age_s: float = 0.0, lr: float = 1e-3, lock_pid: int | None = None, loss=None) -> Path:
    """A run with ``steps`` train records, an eval record with samples and (``final``) final metrics;
    ``loss(step)`` gives the train loss (default ``5 - 0.1 * step``)."""
    run = root / name
    loss = loss or (lambda s: 5.0 - 0.1 * s)
    run.mkdir(parents=True)
    t0 = time.time() - age_s - steps
    lines = [{"time": t0 + s, "step": s, "epoch": s / 100, "loss": loss(s), "lr": lr, "tokens_per_s": 900.0 + s,
              "loss_tokens": 100} for s in range(1, steps + 1)]
    lines.append({"time": t0 + steps, "step": steps, "eval_loss": 4.0, "eval_ppl": 54.6, "eval_tokens": 50})
    lines.append({"time": t0 + steps, "step": steps, "label": f"step {steps}", "samples": [
        {"prompt": "Q: reverse abc\nA:", "generated": " cba", "reference": " cba"},
        {"prompt": "Q: upper <b>x</b>\nA:", "generated": " <script>alert(1)</script>", "reference": " X"}]})
    if final:
        lines.append({"time": t0 + steps, "step": steps, "final": True, "train_loss": loss(steps)})
        (run / "final_metrics.json").write_text(json.dumps({"train_loss": loss(steps), "eval_loss": 4.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "sftune_config.yaml").write_text(f"recipe: quickstart\nmodel:\n  path: builtin:quickstart\n"
                                            f"train:\n  max_steps: {steps}\n  lr: {lr}\n")
    (run / "data_report.json").write_text(json.dumps({"source": "builtin:quickstart", "split": "train"}))
    if checkpoint:
        ck = run / "checkpoints" / f"step-{steps:07d}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"step": steps}))
    if lock_pid is not None:  # as sftune.runlock writes it
        (run / ".sftune.lock").write_text(json.dumps({"pid": lock_pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01 00:00:00"}))
    if age_s:
        for f in run.rglob("*"):
            os.utime(f, (time.time() - age_s, time.time() - age_s))
    return run


def chat_run(root: Path, name: str = "chat") -> Path:
    """A finished quickstart run with an untrained (from-scratch) model: the files chat loads."""
    from sftune.config import config_to_yaml, load_config
    from sftune.model import load_model, load_tokenizer

    run = root / name
    cfg = load_config("quickstart", [f"train.output_dir={run}"])
    tokenizer, _ = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    model.save_pretrained(str(run))
    tokenizer.save_pretrained(str(run))
    (run / "sftune_config.yaml").write_text(config_to_yaml(cfg))
    (run / "metrics.jsonl").write_text(json.dumps({"time": time.time(), "step": 1, "loss": 5.5, "lr": 1e-3}) + "\n")
    (run / "final_metrics.json").write_text(json.dumps({"train_loss": 5.5}))
    return run
