"""``sftune eval`` (sftune.evaluate): a run and a baseline scored on the same file with the same
prompts, through the chain's ``prepare`` (one file, in memory), table on stderr and JSON on stdout."""

import json
import shutil

from conftest import write_jsonl


def test_eval_a_run_against_itself_as_baseline(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    from sftune.config import config_to_yaml, load_config
    from sftune.data.formats import choose_format
    from sftune.evaluate import run_eval
    from sftune.export.save import resolved_config

    run = tmp_path / "run"  # a run directory: the model and its resolved config (the qa prompt format)
    shutil.copytree(tiny_model_dir, run)
    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.template": "qa"})
    fmt = choose_format(cfg.data, ["instruction", "output"], tiny_tokenizer)
    (run / "sftune_config.yaml").write_text(config_to_yaml(resolved_config(cfg, fmt)))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])
    out = tmp_path / "eval.json"
    results = run_eval(str(run), str(data), baseline=str(run), limit=2, max_new_tokens=2, out=str(out))
    (only,) = results.values()  # the same model twice: one entry, the same numbers
    assert only["examples"] == 2 and only["loss_tokens"] > 0 and only["generated"] == 2
    assert json.loads(out.read_text())["results"][str(run)]["loss"] == only["loss"]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])[str(run)]["loss"] == only["loss"]
