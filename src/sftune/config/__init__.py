"""The one typed config: the schema (:mod:`.schema`, a pydantic model with a docstring on every
field) and its loading from YAML recipes and ``key=value`` overrides (:mod:`.loading`)."""

from sftune.config.loading import (
    ALIASES,
    apply_overrides,
    RECIPES_DIR,
    builtin_recipes,
    config_to_yaml,
    describe_keys,
    load_config,
    load_yaml,
    parse_override,
    parse_value,
    resolve_recipe,
    valid_keys,
    validate_config,
)
from sftune.config.schema import (
    PER_SOURCE,
    TOKENIZATION,
    UNTRAINED,
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    keys_with,
)

__all__ = ["ALIASES", "PER_SOURCE", "TOKENIZATION", "UNTRAINED", "keys_with", "RECIPES_DIR", "Config", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig",
           "TrainConfig", "apply_overrides", "builtin_recipes", "config_to_yaml", "describe_keys", "load_config", "load_yaml",
           "parse_override", "parse_value", "resolve_recipe", "valid_keys", "validate_config"]
