"""The distill section: defaults (off), ranges and choices validated, every key documented and listed."""

from __future__ import annotations

import pytest

from sftune.config import describe_keys, load_config
from sftune.errors import ConfigError


def test_off_by_default_and_on_with_a_teacher_or_saved_rows():
    assert not load_config(None, {}).distill.enabled
    assert load_config(None, {"distill.teacher": "t"}).distill.enabled
    assert load_config(None, {"distill.saved": "s"}).distill.enabled


@pytest.mark.parametrize("key,value", [("distill.beta", 1.5), ("distill.beta", -0.1), ("distill.alpha", 2),
                                       ("distill.temperature", 0), ("distill.top_k", 0), ("distill.loss", "kl"),
                                       ("distill.top_k_tail", "drop"), ("distill.teacher_dtype", "int8"),
                                       ("distill.prepare_top_k", 0), ("distill.on_policy", 1.5),
                                       ("distill.on_policy", -0.1), ("distill.max_new_tokens", 0),
                                       ("distill.sample_temperature", -1)])
def test_out_of_range_is_refused(key, value):
    with pytest.raises((ConfigError, ValueError)):
        load_config(None, {key: value})


def test_every_key_is_documented_and_listed():
    keys = {k: desc for k, _, desc in describe_keys() if k.startswith("distill.")}
    assert {"distill.teacher", "distill.saved", "distill.loss", "distill.beta", "distill.temperature",
            "distill.alpha", "distill.top_k", "distill.top_k_tail", "distill.teacher_dtype", "distill.on_policy",
            "distill.max_new_tokens", "distill.sample_temperature"} <= set(keys)
    assert all(len(desc) > 20 for desc in keys.values())


def test_a_misspelt_key_names_the_closest():
    with pytest.raises(ConfigError, match="distill.temperature"):
        load_config(None, {"distill.temprature": 2})
