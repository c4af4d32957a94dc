"""Unit tests of sftune.training: the per-step
batches, and what the loop logs (a piped run prints one line per record). The run-level invariants
(grad accumulation, resume, saving) are in test_train.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sftune.training import loop, setup

from conftest import train_config


def test_batches_are_deterministic_per_step(tiny_model_dir, qa_rows_file, tmp_path):
    run = setup(train_config(tiny_model_dir, qa_rows_file, tmp_path, **{"train.batch_size": 4}))
    first = [mb.input_ids.clone() for mb in run.feed(3)]
    run.feed(run.feed.plan.steps_per_epoch + 1)  # another epoch in between
    assert all(torch.equal(a, b.input_ids) for a, b in zip(first, run.feed(3), strict=True))
    run.accelerator.end_training()


def test_piped_run_prints_one_line_per_logged_record(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    """Not a terminal (pytest captures): a 40-step run with log_every=5 shows its 8 records."""
    cfg = train_config(tiny_model_dir, qa_rows_file, tmp_path / "out",
                       **{"train.max_steps": 40, "train.log_every": 5, "train.batch_size": 2})
    run = setup(cfg)
    capsys.readouterr()
    loop(run)  # the loop alone: the final save and report print nothing per step
    run.accelerator.end_training()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"step \d+/40 ", line)]
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(5, 41, 5)), err
    assert len(lines) == 8 and all("loss " in line and "tok/s" in line for line in lines)
    logged = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert [f"{losses[int(line.split()[1].split('/')[0])]:.4f}" for line in lines] == \
           [line.split("loss ")[1].split()[0] for line in lines]  # each line shows its own record's loss
