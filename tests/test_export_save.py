"""Training's final save (sftune.export.save): the tokenizer carries the training prompt as its chat
template, the config spells the format out, and generation stops where training ended turns."""

from __future__ import annotations

import yaml


def test_tokenizer_config_and_stops_carry_the_prompt_contract(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.config import load_config
    from sftune.data.formats import choose_format
    from sftune.export.save import resolved_config, save_tokenizer_and_templates, set_generation_stops

    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.template": "qa"})
    fmt = choose_format(cfg.data, ["instruction", "output"], tiny_tokenizer)
    resolved = resolved_config(cfg, fmt).data  # the format spelled out for inference
    assert (resolved.format, resolved.template) == ("prompt_completion", "qa")
    save_tokenizer_and_templates(cfg, tiny_tokenizer, fmt, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tok.apply_chat_template([{"role": "user", "content": "What?"}], tokenize=False)
    assert prompt == fmt.prompt({"instruction": "What?", "output": ""})
    saved = yaml.safe_load((tmp_path / "sftune_config.yaml").read_text())
    assert (saved["data"]["format"], saved["data"]["template"]) == ("prompt_completion", "qa")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    set_generation_stops(model, tok, fmt)
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
