"""Unit tests of sftune.export.verify: an export's chat template tokenizes the run's prompts to the
trained ids, and a template that drifts is named with the first differing token."""

import json

import pytest

from sftune.config import load_config
from sftune.export.hf import export_run
from sftune.export.verify import verify_export
from sftune.training import train

from conftest import write_jsonl


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    data = write_jsonl(root / "qa.jsonl", [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(8)])
    train(load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(data), "data.template": "qa",
                             "train.output_dir": str(root / "run"), "train.max_steps": 1}))
    return root / "run", export_run(str(root / "run"), str(root / "out"))


def test_exported_template_gives_the_trained_ids(exported):
    run, out = exported
    result = verify_export(str(run), out, n=3)
    assert result.ok, result.lines
    assert sum("PASS row" in line for line in result.lines) == 3 and not any("FAIL" in x for x in result.lines)


def test_a_drifted_template_fails_at_the_first_differing_token(exported, tmp_path):
    import shutil

    run, out = exported
    drifted = shutil.copytree(out, tmp_path / "drifted")
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        path = drifted / name
        if not path.exists():
            continue
        text = path.read_text()
        if name.endswith(".json"):
            cfg = json.loads(text)
            cfg["chat_template"] = cfg.get("chat_template", "").replace("### Answer:", "### Reply:")
            path.write_text(json.dumps(cfg))
        else:
            path.write_text(text.replace("### Answer:", "### Reply:"))
    result = verify_export(str(run), drifted, n=2)
    assert not result.ok
    assert any(line.strip().startswith("FAIL row 0 (chat template): token") for line in result.lines), result.lines
