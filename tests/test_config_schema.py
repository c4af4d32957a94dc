"""Config values are validated up front, with the key named; duplicate YAML keys name both lines."""

import pytest

from sftune.cli import main
from sftune.config import load_config
from sftune.errors import ConfigError


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=-1", "train.grad_accum"),
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-4", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-2", "train.epochs"),
    ("train.epochs=.inf", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.max_steps=-5", "train.max_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.save_every=0", "train.save_every"),
    ("train.eval_every=-1", "train.eval_every"),
    ("data.max_length=1", "data.max_length"),
    ("data.max_length=0", "data.max_length"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
])
def test_out_of_range_values_name_the_key(override, key, capsys):
    code = main(["config", "quickstart", override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert key in err and override.split("=", 1)[1].lstrip(".").lower()[:3] in err.lower()


def test_valid_edge_values_pass():
    cfg = load_config("quickstart", ["train.max_steps=1", "train.batch_size=1", "data.max_length=2",
                                     "train.lr=1e-9", "train.epochs=0.5", "train.max_steps=null",
                                     "train.on_nonfinite=skip", "data.encoding=latin-1"])
    assert cfg.train.max_steps is None and cfg.data.max_length == 2 and cfg.train.on_nonfinite == "skip"


def test_max_length_beyond_the_model_context(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code = main(["preview", "imdb", f"model.path={tiny_model_dir}", f"data.path={data}", "data.max_length=4096"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "data.max_length=4096" in err and "256" in err


def test_duplicate_yaml_keys_name_both_lines(tmp_path, capsys):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("model:\n  path: distilgpt2\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"'lr' appears twice: on line 4 and on line 6"):
        load_config(recipe)
    recipe.write_text("train:\n  lr: 1.0e-3\ndata:\n  path: a.jsonl\ntrain:\n  batch_size: 2\n")
    code = main(["config", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "'train' appears twice: on line 1 and on line 5" in err
