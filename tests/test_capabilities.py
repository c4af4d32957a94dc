"""Unit tests for ``sftune.capabilities`` and the start-up probe's fallbacks (tiny models from configs)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sftune.capabilities import body_of, capabilities, kwargs_lost, lora_error_hint, lora_settings, logit_transforms, window_of
from sftune.data.packing import BatchPlan
from sftune.errors import ConfigError

from test_model_families import BASE, _cfg, build, examples, probe


def test_logit_transforms_only_non_neutral():
    import transformers as T

    assert logit_transforms(T.LlamaConfig(**BASE)) == ()
    assert logit_transforms(T.CohereConfig(**BASE, logit_scale=1.0)) == ()
    assert logit_transforms(T.CohereConfig(**BASE, logit_scale=0.0625)) == ("logit_scale",)
    assert logit_transforms(_cfg("gemma2")) == ("final_logit_softcapping",)
    assert logit_transforms(_cfg("falcon_h1")) == ("lm_head_multiplier",)


def test_window_only_when_a_layer_uses_it():
    import transformers as T

    assert window_of(_cfg("qwen2")) == 8
    assert window_of(T.Qwen2Config(**BASE, use_sliding_window=False, sliding_window=8)) is None
    # sliding only from layer max_window_layers on: with 2 layers and max_window_layers=2, none slides
    assert window_of(T.Qwen2Config(**BASE, use_sliding_window=True, sliding_window=8, max_window_layers=2)) is None
    assert window_of(T.MistralConfig(**BASE, sliding_window=None)) is None
    assert window_of(_cfg("gemma3")) == 8


def test_layouts_from_the_model():
    assert capabilities(build("llama")).layouts == ("flat", "rows", "per_example")
    assert capabilities(build("llama"), kernel="flash_attention_2").layouts == ("rows", "per_example")
    assert capabilities(build("llama"), compile=True).layouts == ("rows", "per_example")
    caps = capabilities(build("lfm2"))
    assert caps.layouts == ("per_example",) and "Lfm2ShortConv" in caps.why_not["flat"]
    assert "position_ids" in capabilities(build("gpt_oss")).why_not["rows"]
    gemma2 = capabilities(build("gemma2"))
    assert set(gemma2.attention_args) == {"sliding_window", "softcap"} and not gemma2.fused_loss
    assert "s_aux" in capabilities(build("gpt_oss")).attention_args


def test_lora_settings_and_hints():
    lora = SimpleNamespace(target_modules="all-linear", dropout=0.05)
    kwargs, notes = lora_settings(build("mixtral"), lora)
    assert kwargs == {"lora_dropout": 0.0} and "expert" in notes[0]
    kwargs, notes = lora_settings(build("falcon_h1"), lora)
    assert kwargs == {"exclude_modules": ["out_proj", "conv1d"]}
    assert lora_settings(build("llama"), lora) == ({}, [])
    assert "lora.dropout=0" in lora_error_hint("lora.ParamWrapper does not work with lora_dropout != 0.")
    assert "out_proj" in lora_error_hint("Module 'out_proj' is incompatible with Mamba-based models")


def test_lora_explicit_mamba_targets_name_the_fix():
    from sftune.config import Config
    from sftune.model import add_lora

    cfg = Config.model_validate({"lora": {"enabled": True, "target_modules": ["in_proj", "out_proj"]}})
    with pytest.raises(ConfigError, match="remove out_proj and conv1d from lora.target_modules"):
        add_lora(cfg, build("falcon_h1"))


def test_per_example_layout_splits_packed_units():
    lengths = np.array([5, 7, 3, 9, 4])
    plan = BatchPlan.build(lengths, batch_size=2, grad_accum=1, packing=True, max_length=16, seed=0,
                           layout="per_example")
    step = plan.epoch_steps(0)[0]
    rows = plan.layout(plan.micro_batches(step)[0])
    assert all(len(r) == 1 for r in rows)
    assert sorted(i for r in rows for i in r) == sorted(i for u in step for i in plan.units[u])


def _claim_everything(monkeypatch):
    """Make capabilities claim every layout and the fused loss: the probe alone must catch it."""
    import sftune.capabilities as c
    import sftune.probe as p

    real = c.capabilities
    monkeypatch.setattr(p, "capabilities", lambda *a, **k: dataclasses.replace(
        real(*a, **k), layouts=("flat", "rows", "per_example"), why_not={}))
    monkeypatch.setattr(c, "LOGIT_TRANSFORMS", ())


def test_probe_falls_back_from_a_leaking_layout(monkeypatch):
    _claim_everything(monkeypatch)
    choice = probe(build("lfm2"))
    assert choice.layout == "per_example" and choice.record["status"] == "fallback"
    assert "flat, rows differed" in choice.line and choice.record["diffs"]["flat"] > 1e-3


def test_probe_falls_back_to_the_unfused_loss(monkeypatch):
    _claim_everything(monkeypatch)
    choice = probe(build("falcon_h1"))  # lm_head_multiplier, hidden from the capabilities here
    assert choice.layout == "per_example" and not choice.fused


def test_probe_strict_refuses_and_off_skips(monkeypatch):
    _claim_everything(monkeypatch)
    with pytest.raises(ConfigError, match="model.check=auto would use the per_example layout"):
        probe(build("lfm2"), check="strict")
    choice = probe(build("lfm2"), check="off")
    assert choice.record["status"] == "off" and choice.layout == "flat"


def test_probe_uses_the_runs_own_examples_and_is_cheap():
    choice = probe(build("qwen2"))
    assert choice.record["examples"] == 3 and choice.record["tokens"] == 30 + 22 + 12
    assert choice.record["ms"] < 5000
    assert all(torch.isfinite(torch.tensor(list(choice.record["diffs"].values()))))
    assert examples()  # the helper stays importable


def test_layers_that_drop_keyword_arguments_are_read_from_the_installed_source():
    """Whether the example boundaries reach attention is read from the installed transformers'
    modeling source (it changes between versions), not from a table: StableLM's decoder layer
    calls its attention without ``**kwargs``; Llama's passes them on."""
    assert kwargs_lost(build("stablelm")) == "StableLmDecoderLayer -> self_attn"
    assert kwargs_lost(build("llama")) is None and kwargs_lost(build("gemma3")) is None
    caps = capabilities(build("stablelm"))
    assert caps.layouts == ("rows", "per_example") and "keyword arguments" in caps.why_not["flat"]


def test_body_lookup():
    """The body is ``base_model`` where that is the body, else the child holding the input embeddings."""
    llama = build("llama")
    assert body_of(llama) is llama.model
    llama4 = build("llama4")
    assert llama4.base_model is llama4 and body_of(llama4) is llama4.model
    assert capabilities(llama4).fused_loss
