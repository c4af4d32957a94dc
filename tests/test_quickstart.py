"""The quickstart end to end (shortened), then every after-training command on its run:
generate, chat through a pipe, eval with a baseline, export + a plain transformers pipeline, report."""

import json
import subprocess
import sys

import pytest

from sftune.cli import main
from sftune.quickstart import TASKS, make_dataset, make_noisy_dataset


def test_generated_data_is_deterministic_and_held_out():
    a, b = make_dataset(300, 50), make_dataset(300, 50)
    assert a["train"]["instruction"] == b["train"]["instruction"]
    assert set(a["train"]["word"]).isdisjoint(a["test"]["word"])
    for row in a["test"]:
        assert row["output"] == TASKS[row["task"]](row["word"])


def test_noisy_data_has_one_wrong_answer_in_five_and_a_clean_held_out_split():
    noisy, clean = make_noisy_dataset(), make_dataset()
    assert noisy["train"]["instruction"] == clean["train"]["instruction"]
    assert noisy["test"]["output"] == clean["test"]["output"]  # held out: clean
    wrong = [r for r in noisy["train"] if not r["correct"]]
    assert 0.18 < len(wrong) / len(noisy["train"]) < 0.22
    for row in noisy["train"]:
        right = TASKS[row["task"]](row["word"])
        assert (row["output"] == right) == row["correct"] and len(row["output"]) == len(right)
    assert make_noisy_dataset()["train"]["output"] == noisy["train"]["output"]  # deterministic


def test_noisy_builtin_loads_by_name():
    from sftune.config import DataConfig
    from sftune.data.sources import load_source

    src = load_source(DataConfig(path="builtin:quickstart-noisy", eval_split="test"))
    assert "correct" in src.train.column_names and len(src.eval) == 200


def test_small_builtin_model_is_the_quickstart_at_half_depth_with_the_same_tokenizer():
    from pathlib import Path

    from sftune.model import resolve_path

    big, small = Path(resolve_path("builtin:quickstart")), Path(resolve_path("builtin:quickstart-small"))
    a, b = (json.loads((d / "config.json").read_text()) for d in (big, small))
    assert (b["n_layer"], b["n_head"], b["n_embd"]) == (2, 2, 128) and a["n_layer"] == 4
    assert {k: v for k, v in a.items() if k not in ("n_layer", "n_head")} == \
        {k: v for k, v in b.items() if k not in ("n_layer", "n_head")}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (big / name).read_text() == (small / name).read_text()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "run"
    code = main(["train", "quickstart", "train.max_steps=500", "eval.limit=60", "train.eval_every=250",
                 f"train.output_dir={out}"])
    assert code == 0
    return out


def test_shortened_quickstart_learns(run):
    metrics = json.loads((run / "final_metrics.json").read_text())
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.15  # the full 2,000-step run reaches over 90%
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in records if "loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    labels = [m["label"] for m in records if "samples" in m]
    assert labels == ["step 250", "step 500", "before training", "after training"]


def test_generate_prompt_and_file(run, tmp_path, capsys):
    assert main(["generate", str(run), "--prompt", "upper abc", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip()  # some completion, cut at EOS
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"instruction": "upper abc", "output": "ABC"}\n{"instruction": "reverse dog", "output": "god"}\n')
    dest = tmp_path / "out.jsonl"
    assert main(["generate", str(run), "--file", str(rows), "--out", str(dest)]) == 0
    got = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [g["prompt"] for g in got] == ["Q: upper abc\nA:", "Q: reverse dog\nA:"]  # the training template
    assert all("generated" in g for g in got)


def test_chat_through_a_pipe(run):
    proc = subprocess.run([sys.executable, "-m", "sftune", "chat", str(run), "--max-new-tokens", "8"],
                          input="upper abc\n/reset\nreverse dog\n/exit\nnever read\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) == 2  # two answers, then /exit stopped the loop
    assert "history cleared" in proc.stderr


def test_eval_with_baseline(run, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(run))).save_pretrained(str(base))
    AutoTokenizer.from_pretrained(str(run)).save_pretrained(str(base))
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", "builtin:quickstart", "--split", "test", "--limit", "40",
                 "--baseline", str(base), "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    tuned, untuned = res[str(run)], res[str(base)]
    assert tuned["loss"] < untuned["loss"]
    assert tuned["exact_match"] >= untuned["exact_match"]
    assert {"perplexity", "contains_match", "exact_match"} <= set(tuned)
    assert "exact match" in capsys.readouterr().err


def test_export_loads_with_plain_pipeline(run, tmp_path):
    from transformers import pipeline

    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    pipe = pipeline("text-generation", str(out))
    result = pipe([{"role": "user", "content": "upper abc"}], max_new_tokens=8, do_sample=False)
    reply = result[0]["generated_text"][-1]["content"]
    # the same text sftune generate gives: the pipeline applied the training prompt template
    from sftune.inference import load_for_inference

    loaded = load_for_inference(str(run))
    ours = loaded.generate([loaded.prompt_from_text("upper abc")], max_new_tokens=8)[0]
    assert reply.strip() == ours.strip()


def test_report_has_plots(run, capsys):
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    for part in ("Final metrics", "Training data", "loss.png", "Sample generations", "kept"):
        assert part in text
    for png in ("loss.png", "lr.png", "throughput.png"):
        assert (run / png).stat().st_size > 5000
