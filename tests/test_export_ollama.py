"""Unit tests of sftune.export.ollama: the Modelfile template reproduces the run's prompts (chat
templates split into per-role pieces, prompt/completion templates with Go escapes)."""

import copy

import pytest

from sftune.config import DataConfig
from sftune.data.formats import MessagesFormat, PromptCompletionFormat
from sftune.data.templates import resolve_chat_template
from sftune.export.ollama import chat_pieces, ollama_template


LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
         "{% endif %}{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + "
         "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "simple", "llama3", "gemma"])
def test_ollama_template_reproduces_the_chat_format(template, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
                                                         "<end_of_turn>"]})
    tok.chat_template = {"llama3": LLAMA3, "gemma": GEMMA}.get(template) or resolve_chat_template(template)[0]
    fmt = MessagesFormat(DataConfig(), tok, "messages")
    pieces = chat_pieces(fmt, tok)
    assert pieces is not None  # checked inside against the format on 1-, 3- and 5-message chats
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert pieces.render(conv) == fmt.prompt_from_text("c", conv[:2])
    go = ollama_template(fmt)
    assert "{{ range .Messages }}" in go and "{{ .Content }}" in go
    if template == "chatml":
        assert pieces.user_pre == "<|im_start|>user\n" and pieces.assistant_post == "<|im_end|>\n"
        assert pieces.system_pre == "<|im_start|>system\n"
    if template == "gemma":
        assert pieces.system_pre is None  # Gemma folds the system prompt into the first user turn


def test_ollama_template_for_prompt_completion():
    fmt = PromptCompletionFormat(DataConfig(template="qa"))
    assert ollama_template(fmt) == "### Question: {{ .Prompt }}\n ### Answer:{{ .Response }}"
    fmt = PromptCompletionFormat(DataConfig(prompt="Q {{{{x}}}}: {q}", completion="{a}"))  # renders "Q {{x}}: "
    assert ollama_template(fmt) == 'Q {{ "{{" }}x}}: {{ .Prompt }}{{ .Response }}'
