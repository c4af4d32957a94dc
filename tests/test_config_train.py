"""The train and eval sections: their own module, the same keys, ranges and roles."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sftune.config import UNTRAINED, Config, keys_with
from sftune.config.train import EvalConfig, TrainConfig


def test_sections_are_the_configs():
    cfg = Config()
    assert isinstance(cfg.train, TrainConfig) and isinstance(cfg.eval, EvalConfig)


def test_ranges_are_checked_and_unknown_keys_refused():
    with pytest.raises(ValidationError):
        TrainConfig(epochs=0)
    with pytest.raises(ValidationError):
        TrainConfig(learning_rate=1e-4)


def test_every_eval_key_is_untrained():
    untrained = set(keys_with(UNTRAINED))
    assert {f"eval.{k}" for k in EvalConfig.model_fields} <= untrained
    assert "train.output_dir" in untrained and "train.lr" not in untrained
