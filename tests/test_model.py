"""Unit tests of sftune.model: the tokenizer and model loaders, the pad rule, max_length against the
model's context, LoRA and the parameter count."""

from sftune.cli import main


def test_max_length_beyond_the_model_context(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code = main(["preview", "imdb", f"model.path={tiny_model_dir}", f"data.path={data}", "data.max_length=4096"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "data.max_length=4096" in err and "256" in err


def test_max_length_defaults_to_the_smallest_limit(tiny_model_dir, tiny_tokenizer):
    from types import SimpleNamespace

    from sftune.config import load_config
    from sftune.model import load_model_config, model_max_positions, resolve_max_length

    cfg = load_config(None, {"model.path": str(tiny_model_dir)})
    model_config = load_model_config(cfg)
    assert model_max_positions(model_config) == 256
    assert resolve_max_length(cfg, tiny_tokenizer, model_config) == 256  # the model's 256 < 1024
    assert resolve_max_length(cfg, SimpleNamespace(model_max_length=10**30), None) == 1024  # "no limit" sentinel
    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.max_length": 64})
    assert resolve_max_length(cfg, tiny_tokenizer, model_config) == 64


def test_pad_rule_and_the_missing_eos(tiny_tokenizer):
    import copy

    import pytest

    from sftune.errors import SftuneError
    from sftune.model import ready_tokenizer

    tok = copy.deepcopy(tiny_tokenizer)
    tok.pad_token = None
    ready_tokenizer(tok)
    assert tok.pad_token == tok.eos_token  # EOS doubles as pad
    tok.eos_token = None
    with pytest.raises(SftuneError, match="no EOS token"):
        ready_tokenizer(tok, "the tokenizer 'x'")


def test_load_tokenizer_adds_the_chat_template_tokens(tiny_model_dir):
    from sftune.config import load_config
    from sftune.model import load_tokenizer

    tok, n_added = load_tokenizer(load_config(None, {"model.path": str(tiny_model_dir), "data.chat_template": "chatml"}))
    assert n_added == 2 and tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id
    assert "<|im_start|>" in tok.chat_template and tok.padding_side == "right"


def test_lora_model_counts_trainable_parameters(tiny_model_dir, tiny_tokenizer):
    from sftune.config import load_config
    from sftune.model import count_parameters, load_model, unwrap_causal_lm

    cfg = load_config(None, {"model.path": str(tiny_model_dir), "lora.enabled": True, "lora.r": 2})
    model = load_model(cfg, tiny_tokenizer)  # lora.enabled: wrapped by peft
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert type(unwrap_causal_lm(model)).__name__ == "GPT2LMHeadModel"


def test_missing_model_directory_is_one_clear_line(tmp_path):
    import pytest

    from sftune.config import load_config
    from sftune.errors import SftuneError
    from sftune.model import load_model_config

    with pytest.raises(SftuneError, match="no such directory"):
        load_model_config(load_config(None, {"model.path": str(tmp_path / "nope")}))
