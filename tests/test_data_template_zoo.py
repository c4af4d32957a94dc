"""Every template of the zoo (template_zoo.py) x every conversation, checked by an oracle that does
not use sftune's code: every assistant turn's context ids are the inference prompt's ids
(``apply_chat_template(..., add_generation_prompt=True)`` tokenized), its trained tokens decode to
exactly what the generator says the template writes for that turn after that prompt, stop token
included, each turn is trained once, and no tool result, system, user or schema text is trained.

The fast suite checks a fixed sample of 40 templates covering every value of every dimension; a
slow-marked test checks every 16th template of the whole product, or all of it with
``SFTUNE_ZOO=full``. Packed == unpacked holds on zoo rows.
"""

from __future__ import annotations

import copy
import random

import pytest

import template_zoo as Z
from test_data_chat_templates import build, decode, runs
from sftune.config import DataConfig
from sftune.data.chat import MessagesFormat
from sftune.data.tokenize import RowTokenizer

_TOKENIZERS: dict = {}


def zoo_tokenizer(style: str, tags: str, tmp_dir):
    """A tokenizer of ``style`` with the zoo's structure tokens special and its tags special, added
    (not special) or plain text; saved with a generation config whose EOS ids are the tokenizer's
    EOS and the tokens that open a message (what models of templates without end token stop on)."""
    key = (style, tags)
    if key not in _TOKENIZERS:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer, GenerationConfig

        specials = ["<unk>", "<s>", "</s>"] + Z.STRUCTURE + (Z.TAGS if tags == "special" else [])
        tok = build(style, specials, Z.CORPUS, vocab_size=400)
        if tags == "added":
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in Z.TAGS])
        path = tmp_dir / f"{style}-{tags}"
        tok.save_pretrained(path)
        openers = ["<|im_start|>", "<|start_header_id|>", "<|user|>", "<|tool|>"]
        GenerationConfig(eos_token_id=[tok.eos_token_id] + tok.convert_tokens_to_ids(openers)).save_pretrained(path)
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(path)
    tok = copy.copy(_TOKENIZERS[key])
    return tok


def check(style: Z.Style, tmp_dir, packed: bool = False) -> int:
    """Check every conversation on one zoo template; returns the number of turns checked.
    ``packed``: also check that the rows' loss packed in one row equals their losses one by one."""
    tok = zoo_tokenizer(style.tokenizer, style.tags, tmp_dir)
    tok.chat_template = Z.template(style)
    fmt = MessagesFormat(DataConfig(), tok, "messages", "tools")
    rows = {"messages": [c for c, _ in Z.CONVERSATIONS.values()], "tools": [t for _, t in Z.CONVERSATIONS.values()]}
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source=style.name)(rows)
    assert not any(out["skip"]), (style.name, out["skip"])
    if packed:
        from test_data_tools import assert_packed_equals_unpacked

        assert_packed_equals_unpacked(len(tok), list(zip(out["input_ids"], out["labels"])))
    checked = 0
    for r, (name, (conv, tools)) in enumerate(Z.CONVERSATIONS.items()):
        targets = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
        prompts = {i: tok(tok.apply_chat_template(conv[:i], tools=tools, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"] for i in targets}
        seen = []
        for ids, labels, row in zip(out["input_ids"], out["labels"], out["row"]):
            if row != r:
                continue
            for s, e in runs(labels):
                match = [i for i in targets if prompts[i] == ids[:s] and i not in seen]
                assert match, (style.name, name, "a trained run whose context is no inference prompt",
                               decode(tok, ids[:s])[-80:], decode(tok, ids[s:e]))
                i = match[0]
                seen.append(i)
                got = decode(tok, ids[:e])[len(decode(tok, ids[:s])):]
                want = Z.expected_turn(style, conv, i)
                assert got == want, (style.name, name, i, got, want)
                assert not any(t in got for t in Z.NEVER_TRAINED), (style.name, name, i, got)
        assert sorted(seen) == targets, (style.name, name, seen, targets)
        checked += len(targets)
    return checked


def sample(n: int, seed: int = 0) -> list[Z.Style]:
    """``n`` styles, every value of every dimension among them."""
    everything = Z.styles()
    rng = random.Random(seed)
    out = []
    for dim, values in Z.DIMENSIONS.items():
        for v in values:
            out.append(rng.choice([s for s in everything if getattr(s, dim) == v]))
    out += rng.sample(everything, max(0, n - len(out)))
    return out[:max(n, len(out))]


SAMPLE = sample(40)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.parametrize("style", SAMPLE, ids=lambda s: s.name)
def test_zoo_sample_is_exact(style, tmp_dir):
    assert check(style, tmp_dir) == 10


def test_packed_equals_unpacked_with_zoo_rows(tmp_dir):
    for style in SAMPLE[:3]:
        check(style, tmp_dir, packed=True)


@pytest.mark.slow
def test_zoo_product_is_exact(tmp_dir):
    """Every 16th template of the full product (about 1,150 templates x 5 conversations, a few
    minutes); ``SFTUNE_ZOO=full`` checks all of it (about 18,400 templates, an hour on one core)."""
    import os

    styles = Z.styles()[::1 if os.environ.get("SFTUNE_ZOO") == "full" else 16]
    failed = []
    for style in styles:
        try:
            check(style, tmp_dir)
        except AssertionError as e:
            failed.append(f"{style.name}: {str(e)[:300]}")
    assert not failed, f"{len(failed)} of {len(styles)} zoo templates:\n" + "\n".join(failed[:20])
