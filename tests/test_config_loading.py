"""Unit tests of sftune.config.loading: recipes, YAML files and key=value overrides into a Config;
unknown keys name the closest valid one; duplicate YAML keys name both lines."""

import pytest

from sftune.cli import main
from sftune.config import builtin_recipes, load_config, parse_value
from sftune.errors import ConfigError


def test_builtin_recipes_load():
    assert {"quickstart", "imdb", "codealpaca", "alpaca"} <= set(builtin_recipes())
    for name in builtin_recipes():
        cfg = load_config(name)
        assert cfg.recipe == name
        assert cfg.train.output_dir == f"runs/{name}"


def test_overrides_are_typed():
    cfg = load_config("codealpaca", ["data.max_length=256", "train.lr=1e-4", "lora.enabled=true",
                                     "data.remove_columns=[a, b]", "train.mixed_precision=no"])
    assert cfg.data.max_length == 256
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.lora.enabled is True
    assert cfg.data.remove_columns == ["a", "b"]
    assert cfg.train.mixed_precision == "no"


def test_template_values_stay_verbatim():
    assert parse_value("### Question: {instruction}\\n ### Answer:") == "### Question: {instruction}\\n ### Answer:"
    assert parse_value(" {output}") == " {output}"
    assert parse_value("null") is None
    assert parse_value("5e-5") == "5e-5"  # pydantic turns it into a float for float fields


@pytest.mark.parametrize("bad,suggestion", [
    ("data.pth=x", "data.path"),
    ("train.learning_rate=1", "train.lr"),
    ("data.max_len=5", "data.max_length"),
    ("trian.lr=1", "train.lr"),
])
def test_unknown_key_names_closest(bad, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config("quickstart", [bad])
    assert suggestion in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data:\n  pathh: x\n")
    with pytest.raises(ConfigError, match="data.path"):
        load_config(p)


def test_bad_value_is_short_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("quickstart", ["train.batch_size=lots"])


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("quickstar")


def test_duplicate_yaml_keys_name_both_lines(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("model:\n  path: distilgpt2\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"'lr' appears twice: on line 4 and on line 6"):
        load_config(recipe)
    recipe.write_text("train:\n  lr: 1.0e-3\ndata:\n  path: a.jsonl\ntrain:\n  batch_size: 2\n")
    code = main(["config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "'train' appears twice: on line 1 and on line 5" in err


def test_one_dotted_override_function():
    """The command line and the dashboard apply overrides with the same function: nested sections,
    whole-section values and the closest-key refusal."""
    from sftune.config import apply_overrides, validate_config

    raw = {"data": {"max_length": 64}}
    items = apply_overrides(raw, ["data.max_length=128", "train.lr=0.5", "recipe=x"])
    assert raw == {"data": {"max_length": 128}, "train": {"lr": 0.5}, "recipe": "x"} and len(items) == 3
    assert validate_config(raw).data.max_length == 128
    with pytest.raises(ConfigError, match="data.max_length"):
        apply_overrides({}, {"data.max_len": 3})
