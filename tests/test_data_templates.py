"""Unit tests of sftune.data.templates: {column} templates (fields, literal braces, malformed ones),
the named prompt/completion templates and the built-in chat templates."""

import pytest

from sftune.data.templates import NAMED_TEMPLATES, parse_fields
from sftune.errors import ConfigError


def test_parse_fields_and_literal_braces():
    assert parse_fields("### Q: {instruction}\n{{literal}} {input}") == ["instruction", "input"]


@pytest.mark.parametrize("bad", ["### {instruction", "oops }", "{a.b}", "{0}", "{x!r}", "{x:>10}", "{}"])
def test_malformed_templates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        parse_fields(bad)


def test_named_templates_listed():
    assert set(NAMED_TEMPLATES) == {"qa", "alpaca", "alpaca_h4"}


def test_is_template_and_named_lookups():
    from sftune.data.templates import CHATML, is_template, named_template, resolve_chat_template

    assert is_template("{instruction}") and not is_template("instruction") and is_template("oops }")
    assert named_template("qa").render({"instruction": "x", "output": "y"}) == ("### Question: x\n ### Answer:", " y")
    with pytest.raises(ConfigError, match="Built-in templates: qa, alpaca, alpaca_h4"):
        named_template("qaa")
    assert resolve_chat_template("chatml") == (CHATML, ["<|im_start|>", "<|im_end|>"])
    assert resolve_chat_template("{{ messages }}") == ("{{ messages }}", [])
    with pytest.raises(ConfigError, match="neither a built-in name"):
        resolve_chat_template("llama-2")
