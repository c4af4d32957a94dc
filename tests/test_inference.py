"""Loading a run for inference (``sftune.inference``): the run's saved format identity rebuilds the
training prompt, so generate / chat / eval prompt exactly as the model was trained."""

import shutil

import pytest
import yaml

from sftune.config import load_config
from sftune.data.templates import CHATML
from sftune.errors import DataError, SftuneError
from sftune.export.hf import resolved_config
from sftune.data.formats import choose_format
from sftune.inference import load_for_inference


def fake_run(model_dir, tmp_path, data: dict, chat_template: str | None = None):
    """A model directory with the sftune_config.yaml a run writes (the format spelled out)."""
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    cfg = load_config(None, {f"data.{k}": v for k, v in data.items()})
    if chat_template:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(run))
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = chat_template
        tok.save_pretrained(str(run))
    fmt = choose_format(cfg.data, [], None if not chat_template else load_for_inference(str(run)).tokenizer)
    (run / "sftune_config.yaml").write_text(yaml.safe_dump(resolved_config(cfg, fmt).model_dump(mode="json")))
    return run


def test_prompt_completion_run_prompts_as_trained(tiny_model_dir, tmp_path):
    loaded = load_for_inference(str(fake_run(tiny_model_dir, tmp_path, {"template": "qa"})))
    assert not loaded.is_chat and loaded.add_bos
    assert loaded.prompt_from_text("What is 2+2?") == "### Question: What is 2+2?\n ### Answer:"
    # a prompts file needs only the prompt's columns
    assert loaded.prompt_from_row({"instruction": "hi"}) == "### Question: hi\n ### Answer:"
    with pytest.raises(DataError, match="instruction"):
        loaded.prompt_from_row({"question": "hi"})


def test_chat_run_prompts_with_history(tiny_model_dir, tmp_path):
    run = fake_run(tiny_model_dir, tmp_path, {"format": "messages"}, chat_template=CHATML)
    loaded = load_for_inference(str(run))
    assert loaded.is_chat and not loaded.add_bos
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    expected = loaded.tokenizer.apply_chat_template(history + [{"role": "user", "content": "more"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert loaded.prompt_from_text("more", history) == expected
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in loaded.fmt.stop_ids(loaded.tokenizer)  # the template's end-of-turn stops generation
    # a conversation ending with the user's turn prompts for the next assistant turn
    row = {"messages": history + [{"role": "user", "content": "more"}]}
    assert loaded.prompt_from_row(row) == expected


def test_plain_model_without_config_uses_raw_text(tiny_model_dir):
    loaded = load_for_inference(str(tiny_model_dir))
    assert loaded.cfg is None and loaded.prompt_from_text("abc") == "abc"


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(SftuneError, match="does not exist"):
        load_for_inference(str(tmp_path / "nope"))
