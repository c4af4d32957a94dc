"""Unit tests of sftune.dashboard.newrun: the new-run form's fields come from the config schema (kind,
choices, recipe value, description), and a run name must stay inside the runs directory."""

import typing

import pytest

from sftune.dashboard.newrun import _kind, schema, start
from sftune.errors import ConfigError


def test_field_kinds():
    assert _kind(bool) == ("bool", None, False) and _kind(int | None) == ("int", None, True)
    assert _kind(typing.Literal["a", "b"]) == ("choice", ["a", "b"], False)
    assert _kind(list[str]) == ("json", None, False) and _kind(int | str) == ("json", None, False)


def test_schema_has_every_key_with_the_recipe_value():
    from sftune.config import valid_keys

    fields = {f["key"]: f for f in schema("quickstart")}
    assert set(fields) == set(valid_keys()) - {"recipe"}  # every section key (the recipe name is not a field)
    assert fields["train.max_steps"]["value"] == 2000 and fields["train.max_steps"]["default"] is None
    assert fields["train.scheduler"]["kind"] == "choice" and all(f["description"] for f in fields.values())


@pytest.mark.parametrize("name", ["", ".hidden", "../out", "a//b", "a/../../b"])
def test_run_names_outside_the_runs_directory_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="run name|runs directory"):
        start(tmp_path, "quickstart", {}, name)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started
