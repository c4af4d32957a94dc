"""The quickstart: deterministic generated data, and a shortened end-to-end run."""

import json

from sftune.quickstart import TASKS, make_dataset


def test_generated_data_is_deterministic_and_held_out():
    a, b = make_dataset(300, 50), make_dataset(300, 50)
    assert a["train"]["instruction"] == b["train"]["instruction"]
    assert set(a["train"]["word"]).isdisjoint(a["test"]["word"])
    for row in a["test"]:
        assert row["output"] == TASKS[row["task"]](row["word"])


def test_shortened_quickstart_learns_and_stops_at_eos(tmp_path):
    from sftune.cli import main

    out = tmp_path / "qs"
    code = main(["train", "quickstart", "train.max_steps=500", "eval.limit=60", f"train.output_dir={out}"])
    assert code == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.15  # the full 2,000-step run reaches over 90%
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in final if "loss" in m]
    assert losses[-1] < 0.5 * losses[0]
