"""The command line: help, preview, errors without tracebacks, and the recipes run offline."""

import json

import pytest

from sftune.cli import main

from conftest import SHARED, write_jsonl


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "preview", "config"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "key=value" in capsys.readouterr().out


def test_unknown_key_is_short_error(capsys):
    code, out, err = run_cli(["preview", "quickstart", "data.max_len=3"], capsys)
    assert code == 2
    assert "data.max_length" in err and "Traceback" not in err


def test_config_keys(capsys):
    code, out, _ = run_cli(["config", "--keys"], capsys)
    assert code == 0 and "data.max_length" in out and "train.grad_accum" in out


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi there"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "See you."}]},
    ] * 3)


def test_preview_json_shape_chat(tiny_model_dir, chat_file, capsys):
    code, out, err = run_cli(["preview", "quickstart", f"model.path={tiny_model_dir}", f"data.path={chat_file}",
                              "data.eval_split=null", "data.chat_template=chatml", "data.format=messages", "-n", "2",
                              "--json"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    for obj in lines:
        assert set(obj) >= {"input_ids", "labels", "position_ids", "text"}
        assert len(obj["input_ids"]) == len(obj["labels"]) == len(obj["position_ids"])
        assert "<|im_start|>assistant" in obj["text"]
    assert "EOS trained" in err and "kept" in err


def test_preview_colored_text(tiny_model_dir, tmp_path, capsys):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "What?", "output": "That."}] * 4)
    code, out, err = run_cli(["preview", "codealpaca", f"model.path={tiny_model_dir}", f"data.path={f}", "-n", "1",
                              "data.packing=true"], capsys)
    assert code == 0, err
    assert "### Question: What?" in out and "packing" in out  # the view is the output (stdout)


def _tutorial_data(tmp_path):
    """Real files from ../shared when present, otherwise small stand-ins with the same columns."""
    imdb = SHARED / "data" / "imdb_5000.jsonl"
    code = SHARED / "data" / "codealpaca_2k.json"
    if not imdb.exists():
        imdb = write_jsonl(tmp_path / "imdb.jsonl", [{"text": "A fine film. " * 20, "label": 1}] * 20)
    if not code.exists():
        code = write_jsonl(tmp_path / "code.jsonl", [{"instruction": "Add", "input": "", "output": "a+b"}] * 20)
    h4 = write_jsonl(tmp_path / "h4.jsonl", [{"prompt": "Name a color", "completion": "Blue", "meta": {"x": 1}}] * 20)
    return {"imdb": imdb, "codealpaca": code, "alpaca": h4}


@pytest.mark.parametrize("recipe", ["imdb", "codealpaca", "alpaca"])
def test_tutorial_recipes_run_offline(recipe, tiny_model_dir, tmp_path, capsys):
    data = _tutorial_data(tmp_path)[recipe]
    out_dir = tmp_path / recipe
    code, out, err = run_cli(["train", recipe, f"model.path={tiny_model_dir}", f"data.path={data}",
                              "data.limit=32", "data.max_length=128", "train.max_steps=2", "train.batch_size=4",
                              f"train.output_dir={out_dir}"], capsys)
    assert code == 0, err
    assert (out_dir / "model.safetensors").exists() and (out_dir / "sftune_config.yaml").exists()


def test_generate_as_training_set_is_sequence_level_distillation(tiny_model_dir, tmp_path, no_plots):
    """sftune generate --as-training-set: the teacher's completions become rows that train as they are."""
    import json

    from sftune.cli import main, training_row
    from sftune.config import load_config
    from sftune.training import train

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "old"}]}
    assert training_row(chat, "user: hi\\nassistant:", "new") == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "new"}]}
    assert training_row({"instruction": "x"}, "Q: x\nA:", " y") == {"prompt": "Q: x\nA:", "completion": " y"}
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"The quick brown {w}"}) + "\n" for w in ("fox", "dog", "cat")))
    dest = tmp_path / "teacher.jsonl"
    assert main(["generate", str(tiny_model_dir), "--file", str(rows), "--out", str(dest), "--as-training-set",
                 "--max-new-tokens", "4"]) == 0
    made = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len(made) == 3 and all(set(r) == {"prompt", "completion"} for r in made)
    result = train(load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(dest),
                                      "train.output_dir": str(tmp_path / "student"), "train.max_steps": 1,
                                      "train.batch_size": 3}))
    assert result.steps == 1
