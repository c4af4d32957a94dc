"""Unit tests of sftune.errors: what a user-facing error says (where, what, what to do)."""

from sftune.errors import ConfigError, DataError, RowSkip, SftuneError


def test_data_error_names_source_row_column_and_hint():
    e = DataError("is empty", source="train.jsonl", row=3, column="output", hint="fill it in or drop the row")
    assert str(e) == "train.jsonl, row 3, column 'output': is empty\n  → fill it in or drop the row"
    assert (e.source, e.row, e.column, e.reason) == ("train.jsonl", 3, "output", "is empty")
    assert str(DataError("no rows")) == "no rows" and str(DataError("bad", row=0)) == "row 0: bad"


def test_user_errors_share_one_base_and_a_skip_is_not_one():
    assert issubclass(ConfigError, SftuneError) and issubclass(DataError, SftuneError)
    assert not issubclass(RowSkip, SftuneError) and RowSkip("empty output").reason == "empty output"
