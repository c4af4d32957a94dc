"""Config key roles (sftune.config.roles): declared once on the schema's fields, read by the code that
needs them (the cluster's resume check, the data signature, the tokenization cache key)."""



def test_key_roles_are_declared_once_in_the_schema():
    """Which keys are per source, change tokenization, or leave what is trained unchanged is read
    from the schema's field declarations (sftune.cluster, sftune.data.position / one_source read them)."""
    from sftune.config import PER_SOURCE, TOKENIZATION, UNTRAINED, keys_with
    from sftune.config.schema import SOURCE_KEYS, SourceConfig
    from sftune.data.one_source import TOKENIZATION_KEYS

    assert tuple(k.removeprefix("data.") for k in keys_with(PER_SOURCE)) == SOURCE_KEYS
    assert set(SOURCE_KEYS) <= set(SourceConfig.model_fields)
    assert set(keys_with(TOKENIZATION)) <= set(keys_with(PER_SOURCE))
    assert TOKENIZATION_KEYS and "path" not in TOKENIZATION_KEYS and "chat_template_kwargs" in TOKENIZATION_KEYS
    untrained = keys_with(UNTRAINED)
    assert {"train.resume", "train.output_dir", "data.num_proc", "eval.samples"} <= set(untrained)
    assert not {"train.lr", "data.max_length", "model.path"} & set(untrained)


def test_a_restart_may_change_untrained_keys_only(tmp_path):
    from sftune.cluster import config_differences
    from sftune.config import config_to_yaml, load_config

    saved = tmp_path / "sftune_config.yaml"
    saved.write_text(config_to_yaml(load_config(None, {"train.lr": 1e-3})))
    assert config_differences(load_config(None, {"train.lr": 1e-3, "train.log_every": 3, "eval.samples": 0,
                                                 "data.num_proc": 2}), saved) == []
    assert config_differences(load_config(None, {"train.lr": 2e-3}), saved) == ["train.lr: 0.001 -> 0.002"]
