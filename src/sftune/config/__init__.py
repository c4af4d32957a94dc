"""The one typed config: the schema (:mod:`.schema`, a pydantic model with a docstring on every
field) and its loading from YAML recipes and ``key=value`` overrides (:mod:`.loading`)."""

from sftune.config.loading import (
    ALIASES,
    RECIPES_DIR,
    apply_overrides,
    builtin_recipes,
    config_to_yaml,
    describe_keys,
    keys_with,
    load_config,
    load_yaml,
    parse_override,
    parse_value,
    resolve_recipe,
    valid_keys,
    validate_config,
)
from sftune.config.roles import PER_SOURCE, TOKENIZATION, UNTRAINED
from sftune.config.schema import Config, DataConfig, EvalConfig, LoraConfig, ModelConfig, TrainConfig

__all__ = ["ALIASES", "PER_SOURCE", "RECIPES_DIR", "TOKENIZATION", "UNTRAINED", "Config", "DataConfig", "EvalConfig",
           "LoraConfig", "ModelConfig", "TrainConfig", "apply_overrides", "builtin_recipes", "config_to_yaml",
           "describe_keys", "keys_with", "load_config", "load_yaml", "parse_override", "parse_value", "resolve_recipe",
           "valid_keys", "validate_config"]
