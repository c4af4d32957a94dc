"""Turn boundaries: where an assistant turn's trained text starts and where it stops (one rule).

:func:`turn_text` implements the rule for every chat template; :class:`TokenView` is what it needs
to know about the tokenizer (token boundaries, added tokens, stop tokens).
"""

from __future__ import annotations

import re
from typing import Callable

from sftune.data.contract import BadRow
from sftune.data.tools import MARK, common_prefix, common_suffix, perturbed

TAG = re.compile(r"<[^<>\s]{1,64}>")
"""An XML-like tag (``<think>``, ``</tool_call>``, ``<|im_end|>``, ``<｜Assistant｜>``): never cut inside."""

HAND_OVER = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>",
             "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>")
"""End-of-turn, end-of-message and hand-over tokens of published templates (stops where they are tokens)."""


class TokenView:
    """The tokenizer as the rule sees it: ``atoms`` (added tokens, special or not, longest first),
    ``stops`` (stop token strings), and :meth:`starts` (token boundaries of a text tokenized alone)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}).values()
        atoms = {t.content for t in added} | {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
        self.atoms = sorted((a for a in atoms if a), key=len, reverse=True)
        self.stops = sorted(set(stops), key=len, reverse=True)

    def starts(self, text: str) -> set[int]:
        """Character positions where a token starts when ``text`` is tokenized alone (and its end)."""
        tok = self.tokenizer
        if getattr(tok, "is_fast", False):
            offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            return {s for s, _ in offsets} | {len(text)}
        ids, out = tok(text, add_special_tokens=False)["input_ids"], {0, len(text)}
        for j in range(1, len(ids)):  # a slow tokenizer: where the decoded prefixes end
            head = tok.decode(ids[:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if text.startswith(head):
                out.add(len(head))
        return out

    def units(self, text: str) -> list[tuple[int, int]]:
        """Spans never cut: XML-like tags and added tokens."""
        spans = [m.span() for m in TAG.finditer(text)]
        for a in self.atoms:
            at = text.find(a)
            while at >= 0:
                spans.append((at, at + len(a)))
                at = text.find(a, at + 1)
        return spans

    def first_atom(self, text: str, start: int, end: int, among: list[str] | None = None) -> tuple[int, str] | None:
        """The first of ``among`` (default: any added token) in ``text[start:end]``, longest at a tie."""
        best = None
        for a in self.atoms if among is None else among:
            at = text.find(a, start, end)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(a) > len(best[1]))):
                best = (at, a)
        return best


def _own_end(render, history: list[dict], message: dict, text: str, after: list[dict] = ()) -> int:
    """Where the message's own text ends in ``text`` (its last character the message influences)."""
    try:
        other = render(history + [perturbed(message)] + list(after))
    except BadRow:  # a template that refuses the perturbed message: no anchor from it
        return -1
    return len(text) - common_suffix(text, other) if other != text else -1


def _anchors(render, messages: list[dict], i: int, upto: str, prompt: str, gen_prompt) -> tuple[int, int]:
    """The end of the history's last written own text, in the turn's render and in the prompt: the
    trained text never starts before it."""
    for j in range(i - 1, -1, -1):
        hist, m = messages[:j], messages[j]
        a_u = _own_end(render, hist, m, upto, messages[j + 1:i + 1])
        a_p = _own_end(gen_prompt, hist, m, prompt, messages[j + 1:i])
        if a_u >= 0 and a_p >= 0:
            return a_u, a_p
    return 0, 0


def turn_start(render, gen_prompt, messages: list[dict], i: int, prompt: str, upto: str, other: Callable[[], str],
               view: TokenView) -> int:
    """Where the trained text of turn ``i`` starts in ``upto`` (see :func:`turn_text`)."""
    if upto.startswith(prompt):
        return len(prompt)
    a_u, a_p = _anchors(render, messages, i, upto, prompt, gen_prompt)
    x = common_prefix(upto[a_u:], prompt[a_p:])
    s_u, s_p = view.starts(upto), view.starts(prompt)
    units = [(s - a_u, e - a_u) for s, e in view.units(upto)] + [(s - a_p, e - a_p) for s, e in view.units(prompt)]
    while x > 0 and (a_u + x not in s_u or a_p + x not in s_p or any(s < x < e for s, e in units)):
        x -= 1
    k, r0 = a_u + x, a_p + x
    c = common_prefix(upto, other())
    u_units, p_units = view.units(upto), view.units(prompt)

    def whole(at: int, starts: set[int], spans) -> bool:
        return at in starts and not any(s < at < e for s, e in spans)

    r0 += len(prompt[r0:]) - len(prompt[r0:].lstrip())  # whitespace aside, on both sides
    at = k + len(upto[k:c]) - len(upto[k:c].lstrip())
    heads = [e for e in s_p if r0 < e <= len(prompt) and whole(e, s_p, p_units)]
    for e in sorted(heads, reverse=True):  # R's longest head (whole tokens of P) written before the message's text
        head = prompt[r0:e]
        if upto.startswith(head, at) and at + len(head) <= c and whole(at, s_u, u_units) \
                and whole(at + len(head), s_u, u_units):
            return at + len(head)
    return k


def turn_text(render: Callable[[list[dict]], str], gen_prompt: Callable[[list[dict]], str], messages: list[dict],
              i: int, prompt: str, view: TokenView, where: str, column: str | None = None) -> str:
    """What is trained for assistant turn ``i`` after the inference ``prompt`` (the one rule).

    * **The context is the inference prompt** ``P = gen_prompt(messages[:i])``, whole: never
      shortened, never extended.
    * **Start.** ``U = render(messages[:i+1])`` (the turn as the last message). When ``U`` starts
      with ``P``, the trained text starts at ``len(P)``. Otherwise align after the history's last
      own text (where the last earlier message the template writes ends, in ``U`` and in ``P``:
      found by rendering that message perturbed), and take the longest common part from there that
      ends at a token boundary of ``P`` tokenized alone and of ``U`` tokenized alone, never inside
      an added/special token or an XML-like tag ``<...>``: it ends at ``k`` in ``U``. ``R``, the rest
      of ``P``, is what the prompt has that ``U`` does not there (a pre-filled ``<think>``, the
      history's end written differently when it is last). If ``R``, or its longest head in whole
      tokens of ``P`` (never ending inside a tag), is written in ``U`` right after ``k`` (whitespace
      aside), in whole tokens and before the first character the message itself influences, the
      trained text starts right after it; otherwise at ``k`` (a pre-fill the turn writes otherwise
      stays context).
    * **Stop.** It runs up to and including the first stop token (``view.stops``: EOS, the model's
      generation-config EOS, ``data.stop_token``, the template's end-of-turn token, hand-over tokens
      such as ``<|call|>`` / ``<|eom_id|>``) after the message's own text ends (its last character
      the message influences), and not one token further. A template that writes none stops on the
      token that opens the next message (rendered with one following), which must be a stop token;
      otherwise the row is a :class:`BadRow` saying what could not be decided.
    """
    hist, msg = messages[:i], messages[i]
    upto = render(messages[: i + 1])
    renders: list[str] = []

    def other() -> str:  # the turn rendered with the message's texts perturbed (once, when needed)
        if not renders:
            renders.append(render(hist + [perturbed(msg)]))
        return renders[0]

    start = turn_start(render, gen_prompt, messages, i, prompt, upto, other, view)
    content = msg.get("content") or ""
    plain = content and not any(msg.get(k) for k in ("tool_calls", "reasoning_content", "thinking"))
    if plain and upto.startswith(content, start):  # the turn is the content as it is, then what ends it
        end = start + len(content)
    else:
        end = max(start, len(upto) - common_suffix(upto, other()) if other() != upto else start)
    stop = view.first_atom(upto, end, len(upto), view.stops)
    if stop is not None:
        return upto[start: stop[0] + len(stop[1])]
    # no end token: the token that opens the next message stops generation
    nxt = messages[i + 1] if i + 1 < len(messages) and messages[i + 1]["role"] in ("user", "tool") else \
        {"role": "user", "content": "", "_weight": 0.0}
    nxt = {**nxt, "content": MARK + "next" + MARK}
    more = render(messages[: i + 1] + [nxt])
    at = _own_end(render, hist, msg, more, [nxt])
    at = at if at >= 0 else more.find(upto[start:end]) + (end - start)
    until = more.find(MARK + "next")
    after = at + common_prefix(upto[end:], more[at:until])  # past what the turn writes when it is last
    opener = view.first_atom(more, after, until)
    if opener is not None and more[after:opener[0]].strip():
        opener = None  # plain text opens the next message
    role = msg["role"]
    if opener is not None and opener[1] in view.stops:
        return upto[start:end] + more[at: opener[0] + len(opener[1])]
    what = (f"the next message opens with {opener[1]!r}, which is no stop token" if opener is not None
            else f"the next message opens with {more[after:until][-40:]!r}, no single token")
    raise BadRow(f"message {i} ({role}): {where} writes no end-of-turn token after it and {what}: cannot decide "
                 "where generation stops", column,
                 "set data.stop_token to the token the model stops on (the model's generation_config eos_token_id "
                 "lists it), use a template that ends turns with a token, or set data.on_bad_row=skip")


def generation_eos(tokenizer) -> list[int]:
    """The EOS ids of the model's ``generation_config.json`` next to the tokenizer (local files
    only; ``[]`` when there is none)."""
    path = getattr(tokenizer, "name_or_path", "") or ""
    if not path:
        return []
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except Exception:  # noqa: BLE001 - no generation config: nothing it says
        return []
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return [e for e in eos if isinstance(e, int)]


def stop_tokens(tokenizer, view: TokenView, probed: str | None, stop_token: str | None) -> list[str]:
    """The stop tokens of a template: the tokenizer's EOS, the model's generation-config EOS,
    ``data.stop_token``, the token the template ends a plain reply with (``probed``) and the
    hand-over tokens of :data:`HAND_OVER`; each only where it is one token."""
    from sftune.errors import ConfigError

    def one_token(t: str) -> bool:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)

    if stop_token is not None and not one_token(stop_token):
        raise ConfigError(f"data.stop_token={stop_token!r} is not one token of this tokenizer: name a token of "
                          "its vocabulary (the one the model's generation config stops on)")
    names = [tokenizer.eos_token, probed, stop_token, *HAND_OVER]
    names += [tokenizer.convert_ids_to_tokens(i) for i in generation_eos(tokenizer) if 0 <= i < len(tokenizer)]
    return [t for t in dict.fromkeys(n for n in names if n) if one_token(t)]
