"""The vision config section: listed and documented, validated, and its set keys named."""

from __future__ import annotations

import pytest

from sftune.config import describe_keys, load_config
from sftune.config.vision import set_vision_keys
from sftune.errors import ConfigError


def test_vision_keys_are_listed_with_docs_and_validated():
    rows = {k: d for k, _, d in describe_keys() if k.startswith("vision.")}
    assert {"vision.freeze_vision_tower", "vision.freeze_projector", "vision.freeze_language_model",
            "vision.lr_vision_tower", "vision.lr_projector", "vision.lora_parts",
            "vision.gradient_checkpointing"} <= set(rows)
    assert all(rows.values())
    cfg = load_config(None, {"vision.lr_projector": "1e-4", "vision.lora_parts": ["projector", "language_model"]})
    assert cfg.vision.lr_projector == 1e-4 and cfg.vision.lora_parts == ["projector", "language_model"]
    assert set_vision_keys(cfg.vision) == ["vision.lr_projector=0.0001",
                                           "vision.lora_parts=['projector', 'language_model']"]
    assert set_vision_keys(load_config(None, {}).vision) == []
    for bad in ({"vision.lora_parts": []}, {"vision.lr_vision_tower": "0"}, {"vision.lora_parts": ["tower"]}):
        with pytest.raises((ConfigError, ValueError)):
            load_config(None, bad)
