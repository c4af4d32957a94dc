"""Prompt templates over dataset columns, the named templates, and the named chat templates.

A template is a Python format string whose fields are column names: ``"### Question:
{instruction}\\n ### Answer:"``. Literal braces are written ``{{`` and ``}}``. Templates are parsed
once, up front, so unbalanced braces and unknown columns are config errors, not row errors.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from sftune.errors import ConfigError

_FORMATTER = string.Formatter()


def parse_fields(text: str, what: str = "template") -> list[str]:
    """Column names a template refers to. Raises :class:`ConfigError` on malformed templates."""
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as e:
        raise ConfigError(
            f"{what} {text!r} has unbalanced braces ({e}). Write {{column}} for a column and "
            f"{{{{ or }}}} for a literal brace."
        ) from None
    fields = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if name == "" or name[0].isdigit() or not name.replace("_", "a").replace("-", "a").replace(" ", "a").isalnum():
            raise ConfigError(
                f"{what} {text!r} has the field {{{name}}}: a field must be a plain column name "
                "such as {instruction}."
            )
        if spec or conv:
            raise ConfigError(f"{what} {text!r}: field {{{name}}} may not carry a format spec or conversion.")
        if name not in fields:
            fields.append(name)
    return fields


def is_template(text: str) -> bool:
    """A prompt/completion setting is a template when it has a ``{field}``; else a column name."""
    try:
        return any(name is not None for _, name, _, _ in _FORMATTER.parse(text))
    except ValueError:
        return True  # malformed: parse_fields reports it


@dataclass(frozen=True)
class PromptCompletionTemplate:
    """Prompt and completion templates. ``prompt_no_input`` is used instead of ``prompt`` when the
    row's ``input`` column is empty (the Alpaca convention)."""

    prompt: str
    completion: str
    prompt_no_input: str | None = None
    description: str = ""

    def render(self, values: dict[str, str]) -> tuple[str, str]:
        prompt = self.prompt
        if self.prompt_no_input is not None and not (values.get("input") or "").strip():
            prompt = self.prompt_no_input
        return prompt.format_map(values), self.completion.format_map(values)

    @property
    def fields(self) -> list[str]:
        names = parse_fields(self.prompt) + parse_fields(self.completion)
        if self.prompt_no_input is not None:
            names += parse_fields(self.prompt_no_input)
        return list(dict.fromkeys(names))

    @property
    def optional_fields(self) -> set[str]:
        """Fields that may be missing or null (``input`` for Alpaca)."""
        return {"input"} if self.prompt_no_input is not None else set()

    @property
    def completion_fields(self) -> list[str]:
        return parse_fields(self.completion)


_ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

NAMED_TEMPLATES: dict[str, PromptCompletionTemplate] = {
    "qa": PromptCompletionTemplate(
        prompt="### Question: {instruction}\n ### Answer:",
        completion=" {output}",
        description="The CodeAlpaca tutorial: '### Question: …\\n ### Answer: …' over instruction/output.",
    ),
    "alpaca": PromptCompletionTemplate(
        prompt=_ALPACA_INPUT,
        prompt_no_input=_ALPACA_NO_INPUT,
        completion="{output}",
        description="Stanford Alpaca over instruction/input/output, with and without an input.",
    ),
    "alpaca_h4": PromptCompletionTemplate(
        prompt=_ALPACA_NO_INPUT.replace("{instruction}", "{prompt}"),
        completion="{completion}",
        description="The tutorial's Alpaca form over the prompt/completion columns of "
        "HuggingFaceH4/instruction-dataset.",
    ),
}


def named_template(name: str) -> PromptCompletionTemplate:
    try:
        return NAMED_TEMPLATES[name]
    except KeyError:
        raise ConfigError(
            f"unknown data.template '{name}'. Built-in templates: {', '.join(NAMED_TEMPLATES)}; "
            "or set data.prompt and data.completion to your own templates."
        ) from None


# ----------------------------------------------------------------------------- chat templates

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Uses only the tokenizer's own EOS as the end of an assistant turn: no new tokens, no resize.
SIMPLE_CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

# ChatML with tool calling as Qwen2.5 writes it: schemas in the system turn, calls in <tool_call>,
# results in <tool_response> inside a user turn (a template for models that have none).
CHATML_TOOLS = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{ '# Tools\n\nYou may call functions. Their signatures are within <tools></tools>:\n<tools>' }}"
    "{%- for tool in tools %}{{ '\n' + tool | tojson }}{%- endfor %}"
    "{{ '\n</tools>\n\nWrite each call as <tool_call>\n{\"name\": ..., \"arguments\": {...}}\n</tool_call>"
    "<|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{%- if message.content %}{{ '\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}{%- set call = call.function or call %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call.name + '\", \"arguments\": ' + call.arguments | tojson + '}\n"
    "</tool_call>' }}{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{%- endif %}"
    "{{ '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

NAMED_CHAT_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    # name: (jinja template, special tokens it needs)
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"]),
    "chatml_tools": (CHATML_TOOLS, ["<|im_start|>", "<|im_end|>"]),
    "simple": (SIMPLE_CHAT, []),
}


def resolve_chat_template(value: str) -> tuple[str, list[str]]:
    """A named chat template or a Jinja string -> (template, special tokens it needs)."""
    if value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value, []
    raise ConfigError(
        f"data.chat_template '{value}' is neither a built-in name ({', '.join(NAMED_CHAT_TEMPLATES)}) "
        "nor a Jinja template."
    )
