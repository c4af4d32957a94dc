"""Unit tests of sftune.config.schema: every field documented, values validated up front with the key named."""

import pytest

from sftune.cli import main
from sftune.config import load_config, valid_keys


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


def test_every_field_has_a_docstring():
    from sftune.config import describe_keys

    missing = [k for k, _, d in describe_keys() if not d.strip()]
    assert not missing, missing
    assert "data.max_length" in valid_keys()
