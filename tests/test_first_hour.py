"""A newcomer's first hour (issue 13): the Python API, error wording, output without a terminal,
prompts files, the quickstart's baseline, the alpaca recipe offline and the run report."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest

from sftune.cli import main

from conftest import write_jsonl


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ----------------------------------------------------------------------------- 1. the Python API


def test_train_is_callable_from_the_package_in_a_fresh_process():
    code = ("from sftune import load_config, train\n"
            "assert callable(train), train\n"
            "import inspect; assert 'cfg' in inspect.signature(train).parameters\n"
            "import sftune.training as tr; assert tr.DataPlan and tr.train\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_train_is_a_plain_function_whichever_import_comes_first():
    import inspect

    import sftune
    import sftune.training as tr
    from sftune import train

    assert inspect.isfunction(train) and train is tr.train and sftune.train is tr.train
    assert type(sftune).__name__ == "module" and not callable(tr)  # no module pretends to be a function


# ----------------------------------------------------------------------------- 7. error wording


def test_bad_override_value_blames_the_command_line(capsys):
    code, _, err = run_cli(["preview", "quickstart", "train.lr=abc"], capsys)
    assert code == 2 and "on the command line" in err and "quickstart.yaml" not in err


def test_bad_value_in_a_recipe_blames_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: abc\n")
    code, _, err = run_cli(["preview", str(recipe)], capsys)
    assert code == 2 and "r.yaml" in err and "command line" not in err


@pytest.mark.parametrize("override,expected", [("lr=1e-4", "train.lr"), ("train.lrr=1e-3", "train.lr"),
                                               ("max_steps=3", "train.max_steps"), ("lora.rr=8", "lora.r"),
                                               ("learning_rate=1e-4", "train.lr")])
def test_unknown_key_suggestions(override, expected, capsys):
    code, _, err = run_cli(["preview", "quickstart", override], capsys)
    assert code == 2 and f"Did you mean '{expected}'?" in err and "Traceback" not in err


def test_missing_model_directory_says_so(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    code, _, err = run_cli(["preview", "codealpaca", "model.path=./no-such-model", f"data.path={data}"], capsys)
    assert code == 2 and "no such directory" in err and "Repo id" not in err


def test_train_without_arguments_shows_usage_and_recipes(capsys):
    code, _, err = run_cli(["train"], capsys)
    assert code == 2 and "usage: sftune train" in err and "quickstart" in err and "required" not in err


# ----------------------------------------------------------------------------- 3. rich markup


def test_config_keys_keeps_square_brackets(capsys):
    code, out, _ = run_cli(["config", "--keys"], capsys)
    assert code == 0 and "[c_attn, c_proj]" in out and "[lm_head]" in out


# ----------------------------------------------------------------------------- 2, 4: a short run


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A 2-step codealpaca run (no eval split) with train.eval_every set; its stderr."""
    tmp = tmp_path_factory.mktemp("firsthour")
    data = write_jsonl(tmp / "qa.jsonl", [{"instruction": f"Add {i}", "input": "", "output": f"{i}+1"}
                                         for i in range(16)])
    out = tmp / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", "codealpaca", f"model.path={tiny_model_dir}", f"data.path={data}", "train.max_steps=2",
                     "train.batch_size=4", "train.eval_every=1", f"train.output_dir={out}"])
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def test_eval_every_without_eval_split_says_so(run):
    _, err = run
    assert "train.eval_every=1 is ignored: the data has no eval split" in err
    assert "step 2/2" in err  # the plain progress line (not a terminal)


def test_generate_file_needs_only_prompt_columns(run, tmp_path, capsys):
    out, _ = run
    rows = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "Add 3"}, {"instruction": "Add 4", "output": ""},
                                                    {"instruction": "Add 5", "output": None}])
    dest = tmp_path / "out.jsonl"
    code, _, err = run_cli(["generate", str(out), "--file", str(rows), "--out", str(dest), "--max-new-tokens", "2"],
                           capsys)
    assert code == 0, err
    got = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [g["prompt"] for g in got] == [f"### Question: Add {i}\n ### Answer:" for i in (3, 4, 5)]


def test_generate_file_without_prompt_column_is_a_short_error(run, tmp_path, capsys):
    out, _ = run
    rows = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Add 3"}, {"question": "Add 4"}])
    code, _, err = run_cli(["generate", str(out), "--file", str(rows)], capsys)
    assert code == 2 and "row 1" in err and "'instruction'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 6. the quickstart baseline


def test_builtin_quickstart_baseline_is_the_runs_initial_weights():
    import torch

    from sftune.config import load_config
    from sftune.inference import load_for_inference
    from sftune.model import load_model, load_tokenizer

    cfg = load_config("quickstart", ["train.seed=7"])
    tok, n_added = load_tokenizer(cfg)
    init = load_model(cfg, tok, n_added).state_dict()
    base = load_for_inference("builtin:quickstart", init_seed=7).model.state_dict()
    assert init.keys() == base.keys() and all(torch.equal(init[k], base[k]) for k in init)


# ----------------------------------------------------------------------------- 8. alpaca offline


def test_alpaca_recipe_on_an_alpaca_file(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "Name a color", "input": "", "output": "Blue"},
                                {"instruction": "Add", "input": "1 and 2", "output": "3"}] * 4))
    base = ["preview", "alpaca", f"model.path={tiny_model_dir}", f"data.path={data}", "data.max_length=128", "-n", "1"]
    code, _, err = run_cli(base, capsys)
    assert code == 2 and "data.remove_columns=[]" in err
    code, _, err = run_cli(base + ["data.remove_columns=[]"], capsys)
    assert code == 2 and "data.template=alpaca" in err
    code, out, err = run_cli(base + ["data.remove_columns=[]", "data.template=alpaca"], capsys)
    assert code == 0, err
    assert "[train]" in out and "[test]" not in out  # a single file is its own split


# ----------------------------------------------------------------------------- 9. smaller


def test_quickstart_recipe_comment_matches_the_data():
    from sftune.config import RECIPES_DIR
    from sftune.quickstart import TEST_ROWS, TRAIN_ROWS

    text = (RECIPES_DIR / "quickstart.yaml").read_text()
    assert f"{TRAIN_ROWS:,} train rows, {TEST_ROWS} held-out rows" in text


def test_ctrl_c_prints_the_resume_command(monkeypatch, capsys):
    import sftune.training as tr

    monkeypatch.setattr(tr, "train", lambda cfg: tr.TrainResult(cfg.train.output_dir, 7, 1.0, interrupted=True))
    code, _, err = run_cli(["train", "quickstart", "train.max_steps=50", "train.resume=false"], capsys)
    assert code == 130
    assert "to resume from step 7: sftune train quickstart train.max_steps=50 train.resume=true" in err
