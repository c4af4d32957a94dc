"""Unit tests of sftune.export.lineage: the prompt-contract hash, the data fingerprint and the
``sftune_lineage.json`` an export writes."""

import json

from sftune.config import DataConfig, load_config
from sftune.data.formats import PromptCompletionFormat
from sftune.export.lineage import LINEAGE, data_fingerprint, format_hash, lineage, write_lineage

from conftest import write_jsonl


def test_format_hash_follows_the_prompt_contract(tiny_tokenizer):
    qa = PromptCompletionFormat(DataConfig(template="qa"))
    assert format_hash(qa, tiny_tokenizer) == format_hash(PromptCompletionFormat(DataConfig(template="qa")),
                                                          tiny_tokenizer)
    assert format_hash(qa, tiny_tokenizer) != format_hash(PromptCompletionFormat(DataConfig(template="alpaca")),
                                                          tiny_tokenizer)
    assert len(format_hash(qa, tiny_tokenizer)) == 64


def test_data_fingerprint_of_a_file_a_directory_and_a_hub_id(tmp_path):
    (tmp_path / "d").mkdir()
    data = write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "x"}])
    file_print = data_fingerprint(load_config(None, {"data.path": str(data)}))
    dir_print = data_fingerprint(load_config(None, {"data.path": str(tmp_path / "d")}))
    assert file_print["sha256"] and file_print["files"] == 1 and dir_print["files"] == 1
    data.write_text('{"text": "y"}\n')
    assert data_fingerprint(load_config(None, {"data.path": str(data)}))["sha256"] != file_print["sha256"]
    hub = data_fingerprint(load_config(None, {"data.path": "org/some-dataset"}))
    assert hub["sha256"] is None and "not a local path" in hub["note"]
    assert data_fingerprint(None) is None


def test_lineage_names_base_format_stops_and_data(tiny_model_dir, tiny_tokenizer, tmp_path):
    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.path": "org/ds", "data.template": "qa"})
    fmt = PromptCompletionFormat(cfg.data)
    info = lineage(str(tmp_path), cfg, fmt, tiny_tokenizer, gguf=None)
    assert info["base_model"] == str(tiny_model_dir) and info["lora"] is False and "gguf" in info
    assert info["format"]["hash"] == format_hash(fmt, tiny_tokenizer) and info["format"]["identity"]["template"] == "qa"
    assert info["stop_ids"] == [tiny_tokenizer.eos_token_id] and info["stop_tokens"] == ["<|endoftext|>"]
    path = write_lineage(tmp_path, info)
    assert path.name == LINEAGE and json.loads(path.read_text())["format"] == info["format"]
