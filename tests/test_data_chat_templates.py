"""Chat templates turn by turn: for every assistant turn, the context ids equal the inference prompt's
ids, the trained tokens are exactly what the template writes for that turn (end-of-turn included),
no token is trained twice or skipped, and a prefix-stable template keeps one sequence whose ids equal
the whole conversation tokenized at once.

Each template here is our own and shows one property of a published family (history stripping of
reasoning, a final-turn terminator, a dropped system prompt, a generation prompt that is not a prefix
of the turn, an end-of-conversation EOS, BOS and header tokens). Tokenizers come in both styles:
byte-level BPE with a Qwen/Llama-3-like regex (``\\n\\n`` merges into one token) and
SentencePiece-style Metaspace with byte fallback, with the ``▁`` prefix (``prepend_scheme="first"``)
and without it (``"never"``).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftune.config import DataConfig
from sftune.data.formats import MessagesFormat, PromptCompletionFormat
from sftune.data.tokenize import IGNORE, RowTokenizer, special_prefix

from conftest import shared_file

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start|>", "<|end|>", "<|return|>",
            "<|channel|>", "<|message|>", "<|user|>", "<|assistant|>", "<|system|>", "<|User|>", "<|Assistant|>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

CORPUS = [
    "Hello there! How are you?\n\nI am fine, thanks.", "What is 2+2? It is 4.", "Think step by step.\n\nOK",
    "The quick brown fox jumps over the lazy dog.", "Sort [3, 1, 2] -> [1, 2, 3]", "héllo wörld 日本語 🙂",
    "system user assistant final analysis\n", "  indented\n\n\nnew lines\n", "Be brief. Sure, here it is.",
] * 30

QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def build(style: str, specials: list[str] | None = None, corpus: list[str] | None = None, vocab_size: int = 1000):
    """A small tokenizer of one style (byte-level with the Qwen/Llama-3 regex, or SentencePiece-style
    Metaspace with or without the prefix ``▁``), trained on ``corpus`` with ``specials``."""
    specials = SPECIALS if specials is None else specials
    from tokenizers import Regex, Tokenizer as Tk, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "bytelevel":
        tok = Tk(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = "never" if style == "metaspace_never" else "first"
        tok = Tk(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = [chr(c) for c in range(32, 127)] + ["▁", "\n"]
    # byte-fallback pieces <0x00>..<0xFF> sit in the vocabulary (as SentencePiece models have them)
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)] if style != "bytelevel" else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_pieces,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=specials[3:], clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module", params=["bytelevel", "metaspace", "metaspace_never"])
def tok(request):
    return build(request.param)


# ----------------------------------------------------------------------------- templates and their turns

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen3-like: reasoning is kept only for assistant turns after the last user message.
QWEN3 = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
    "{%- set r = m.get('reasoning_content') or '' %}"
    "{%- if loop.index0 > ns.last %}{{ '<|im_start|>assistant\n<think>\n' + r + '\n</think>\n\n' + m['content'] }}"
    "{%- else %}{{ '<|im_start|>assistant\n' + m['content'] }}{%- endif %}{{ '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")

# gpt-oss-like: the final turn ends with <|return|>, earlier ones with <|end|>.
GPTOSS = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + m['content'] }}"
    "{%- if loop.last and not add_generation_prompt %}{{ '<|return|>' }}{%- else %}{{ '<|end|>' }}{%- endif %}"
    "{%- else %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start|>assistant' }}{%- endif %}")

# Mistral-v0.3-like: the system prompt goes into the last user message, and only when it is the last message.
MISTRAL3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set msgs = messages %}{%- endif %}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{%- if loop.last and sys is defined %}{{ '[INST] ' + sys + '\n\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{ ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}")

# DeepSeek-R1-like: reasoning is cut from every assistant message; the generation prompt opens <think>.
R1 = (
    "{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{%- elif m['role'] == 'system' %}{{ m['content'] }}"
    "{%- else %}{{ '<|Assistant|>' + m['content'].split('</think>')[-1] + eos_token }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{%- endif %}")

# Phi-3-like: an EOS closes the conversation unless a generation prompt follows.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# Llama-3-like: BOS and header tokens written by the template.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def _reasoning(m):
    return m.get("reasoning_content") or ""


TEMPLATES = {  # name: (template, trained text of assistant turn m, prefix-stable)
    "chatml": (CHATML, lambda m: m["content"] + "<|im_end|>", True),
    "qwen3": (QWEN3, lambda m: f"<think>\n{_reasoning(m)}\n</think>\n\n{m['content']}<|im_end|>", False),
    "gptoss": (GPTOSS, lambda m: "<|channel|>final<|message|>" + m["content"] + "<|return|>", False),
    "mistral3": (MISTRAL3, lambda m: " " + m["content"] + "</s>", False),
    "r1": (R1, lambda m: m["content"].split("</think>")[-1] + "</s>", False),
    "phi3": (PHI3, lambda m: m["content"] + "<|end|>", True),
    "llama3": (LLAMA3, lambda m: m["content"].strip() + "<|eot_id|>", True),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
     {"role": "assistant", "content": "Hi! How are you?"}, {"role": "user", "content": "Fine, thanks."},
     {"role": "assistant", "content": "Sure, here it is."}],
    [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "\nnew lines\n\nhere"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "\n\nOK"}],
    [{"role": "assistant", "content": "Hello there! I start."}, {"role": "user", "content": "OK"},
     {"role": "assistant", "content": "Fine."}],
    [{"role": "user", "content": "Think step by step."},
     {"role": "assistant", "content": "It is 4.", "reasoning_content": "2+2 is 4"},
     {"role": "user", "content": "Sort [3, 1, 2]"},
     {"role": "assistant", "content": "[1, 2, 3]", "reasoning_content": "sorted"}],
    [{"role": "user", "content": "héllo wörld 日本語 🙂"}, {"role": "assistant", "content": "  indented 🙂\n"}],
]


def render_prompt(tok, messages):
    if not messages:
        from transformers.utils.chat_template_utils import render_jinja_template

        return render_jinja_template(conversations=[[]], chat_template=tok.chat_template, add_generation_prompt=True,
                                     **tok.special_tokens_map)[0][0]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def runs(labels):
    """Maximal runs of trained positions: (start, end)."""
    out, start = [], None
    for k, lab in enumerate(list(labels) + [IGNORE]):
        if lab != IGNORE and start is None:
            start = k
        elif lab == IGNORE and start is not None:
            out.append((start, k))
            start = None
    return out


def check_conversation(tok, name, conv, train_on="all_assistant"):
    template, turn_text, stable = TEMPLATES[name]
    tok.chat_template = template
    fmt = MessagesFormat(DataConfig(train_on=train_on), tok, "messages")
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="error", source="test")({"messages": [conv]})
    assert out["skip"] == [""] * len(out["skip"]), out["skip"]
    targets = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        targets = targets[-1:]
    prompts = {i: tok(render_prompt(tok, conv[:i]), add_special_tokens=False)["input_ids"] for i in targets}
    seen = []
    for ids, labels in zip(out["input_ids"], out["labels"]):
        assert [lab for lab in labels if lab != IGNORE] == [i for i, lab in zip(ids, labels) if lab != IGNORE]
        for start, end in runs(labels):
            match = [i for i in targets if prompts[i] == ids[:start]]
            assert match, f"{name}: a trained run whose context is no inference prompt: {decode(tok, ids[:start])!r}"
            i = match[0]
            seen.append(i)
            # the trained tokens are the turn as the template writes it, end-of-turn included
            expected = render_prompt(tok, conv[:i]) + turn_text(conv[i])
            assert decode(tok, ids[:end]) == expected, name
    assert sorted(seen) == targets, f"{name}: turns trained {seen}, expected each of {targets} once"
    if stable and len(out["input_ids"]) == 1 and not out["straddled"][0]:
        assert out["input_ids"][0] == tok(tok.apply_chat_template(conv, tokenize=False),
                                          add_special_tokens=False)["input_ids"]
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_every_turn_matches_inference(tok, name, k):
    conv = CONVERSATIONS[k]
    if name == "mistral3" and conv[0]["role"] == "assistant":
        pytest.skip("this template needs a user message before the assistant")
    check_conversation(tok, name, conv)


@pytest.mark.parametrize("name", ["chatml", "qwen3", "gptoss"])
def test_last_assistant_only(tok, name):
    check_conversation(tok, name, CONVERSATIONS[1], train_on="last_assistant")


def test_prefix_stable_template_keeps_one_sequence(tok):
    out = check_conversation(tok, "chatml", CONVERSATIONS[1])
    assert len(out["input_ids"]) == 1


def test_unstable_templates_expand_and_say_why(tok):
    out = check_conversation(tok, "gptoss", CONVERSATIONS[1])
    assert len(out["input_ids"]) == 2 and out["extra"] == [False, True] and out["note"][1]
    out = check_conversation(tok, "qwen3", CONVERSATIONS[4])
    assert len(out["input_ids"]) == 2


def test_reply_starting_with_newline_keeps_whole_conversation_tokenization():
    tok = build("bytelevel")
    assert len(tok("\n\n", add_special_tokens=False)["input_ids"]) == 1  # "\n\n" is one token here
    out = check_conversation(tok, "chatml", CONVERSATIONS[2])
    # the turns whose reply starts with "\n" are trained apart, exactly as inference tokenizes them
    assert any(out["extra"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), min_size=1,
                                 max_size=20).filter(lambda s: s.strip()), min_size=2, max_size=4),
       name=st.sampled_from(["chatml", "qwen3", "gptoss", "phi3", "r1"]))
def test_property_arbitrary_text(tok, contents, name):
    conv = []
    for k, c in enumerate(contents):
        conv.append({"role": "user" if k % 2 == 0 else "assistant", "content": c})
    if conv[-1]["role"] != "assistant":
        conv.append({"role": "assistant", "content": "done"})
    check_conversation(tok, name, conv)


# ----------------------------------------------------------------------------- prompt/completion, SentencePiece


def check_prompt_completion(tok, fmt, rows):
    out = RowTokenizer(fmt, tok, 100_000, on_bad_row="skip", source="test")(
        {k: [r.get(k) for r in rows] for k in rows[0]})
    checked = 0
    for row, ids, labels, skip in zip(rows, out["input_ids"], out["labels"], out["skip"]):
        if skip:
            continue
        prompt, completion = fmt.prompt(row), fmt.reference(row)
        prompt_ids = special_prefix(tok) + tok(prompt, add_special_tokens=False)["input_ids"]
        start = runs(labels)[0][0]
        assert ids[:start] == prompt_ids  # the context is the inference prompt
        assert decode(tok, ids) == decode(tok, prompt_ids) + completion + tok.eos_token
        trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
        assert tok.convert_ids_to_tokens(trained[0]) != "▁"  # no spurious space marker
        checked += 1
    return checked


def test_sentencepiece_prompt_completion_has_no_spurious_marker():
    tok = build("metaspace")
    fmt = PromptCompletionFormat(DataConfig(template="alpaca"))
    rows = [{"instruction": "Say it", "input": "", "output": "New line here"},
            {"instruction": "Sort", "input": "[3, 1, 2]", "output": "[1, 2, 3]"}]
    assert check_prompt_completion(tok, fmt, rows) == 2


@pytest.mark.shared
@pytest.mark.parametrize("name", ["codealpaca_2k.json", "alpaca_5000.json"])
def test_sentencepiece_every_row_real_data(name):
    tok = build("metaspace")
    rows = json.loads(shared_file(name).read_text())
    fmt = PromptCompletionFormat(DataConfig(template="alpaca"))
    assert check_prompt_completion(tok, fmt, rows) >= len(rows) - 10
