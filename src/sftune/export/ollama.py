"""An Ollama ``Modelfile`` beside the GGUF file: the chat format's pieces (found by rendering sentinel
messages through the run's format) written as a Go template, with the stop tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from sftune.data.formats import Format
from sftune.errors import SftuneError


@dataclass
class ChatPieces:
    """The literal text a chat format writes around each role, found by rendering sentinel messages."""

    preamble: str
    user_pre: str
    user_post: str
    assistant_pre: str
    assistant_post: str
    generation: str
    system_pre: str | None = None  # None: the format has no system turn of its own
    system_post: str | None = None

    def render(self, messages: list[dict]) -> str:
        """What the Go template written from these pieces renders (the same logic, for checking)."""
        has_system = any(m["role"] == "system" for m in messages)
        out = [] if has_system and self.system_pre is not None else [self.preamble]
        for m in messages:
            if m["role"] == "system" and self.system_pre is not None:
                out += [self.system_pre, m["content"], self.system_post]
            elif m["role"] == "user":
                out += [self.user_pre, m["content"], self.user_post]
            elif m["role"] == "assistant":
                out += [self.assistant_pre, m["content"], self.assistant_post]
        return "".join(out) + self.generation


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _specials(tokenizer) -> list[str]:
    if tokenizer is None:
        return []
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    return sorted((t for t in found | set(getattr(tokenizer, "all_special_tokens", [])) if t), key=len, reverse=True)


def _role_start(text: str, lo: int, hi: int, specials: list[str], *, default: int) -> int:
    """The last position in ``[lo, hi]`` where a special token followed by a word starts (``default``
    when there is none)."""
    best = None
    for p in range(lo, hi + 1):
        for s in specials:
            if text.startswith(s, p) and p + len(s) < len(text) and text[p + len(s)].isalpha():
                best = p
                break
    return default if best is None else best


def _cut(text: str, marks: list[str]) -> list[str] | None:
    out, pos = [], 0
    for m in marks:
        at = text.find(m, pos)
        if at < 0 or text.count(m) != 1:
            return None
        out.append(text[pos:at])
        pos = at + len(m)
    return out + [text[pos:]]


def chat_pieces(fmt: Format, tokenizer=None) -> ChatPieces | None:
    """Per-role pieces of a chat format, checked against the format on several conversations (``None``:
    its template is not of the uniform kind a simple Go template can reproduce)."""
    U1, A1, U2, S = "SFTUNEUSERONE", "SFTUNEASSISTANTONE", "SFTUNEUSERTWO", "SFTUNESYSTEM"
    try:
        p1 = fmt.prompt_from_text(U1)
        p2 = fmt.prompt_from_text(U2, [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}])
    except Exception:  # noqa: BLE001 - a template that cannot render plain turns
        return None
    seg = _cut(p2, [U1, A1, U2])
    if seg is None or p1 != seg[0] + U1 + seg[3]:
        return None
    # Where one role's text ends and the next begins is ambiguous from text alone; prefer a cut
    # before a special token that names a role (``<|im_start|>user``), so the pieces read naturally.
    specials = _specials(tokenizer)
    n = len(_common_prefix(seg[1], seg[3]))
    q = _role_start(seg[1], 0, n, specials, default=n)
    user_post = seg[1][:q]
    n = len(_common_prefix(seg[0][::-1], seg[2][::-1]))
    user_pre = seg[2][_role_start(seg[2], len(seg[2]) - n, len(seg[2]), specials, default=len(seg[2]) - n):]
    pieces = ChatPieces(preamble=seg[0][:len(seg[0]) - len(user_pre)], user_pre=user_pre, user_post=user_post,
                        assistant_pre=seg[1][len(user_post):], assistant_post=seg[2][:len(seg[2]) - len(user_pre)],
                        generation=seg[3][len(user_post):])
    try:
        ps = _cut(fmt.prompt_from_text(U1, [{"role": "system", "content": S}]), [S, U1])
    except Exception:  # noqa: BLE001 - templates that refuse a system message
        ps = None
    if ps is not None and ps[2] == seg[3] and user_pre and ps[1].endswith(user_pre):
        pieces.system_pre, pieces.system_post = ps[0], ps[1][:len(ps[1]) - len(user_pre)]
    turns = [("u", "Hi there"), ("a", "Hello!"), ("u", "What is 2+2?"), ("a", "4"), ("u", "Thanks")]
    for system in ([None, "Be brief."] if pieces.system_pre is not None else [None]):
        for n in (1, 3, 5):
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user" if r == "u" else "assistant", "content": c} for r, c in turns[:n]]
            try:
                if fmt.prompt_from_text(msgs[-1]["content"], msgs[:-1]) != pieces.render(msgs):
                    return None
            except Exception:  # noqa: BLE001
                return None
    return pieces


def _go_literal(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(fmt: Format) -> str | None:
    """The Modelfile ``TEMPLATE`` (Go template syntax) that prompts as the run's format does."""
    if not fmt.is_chat:
        before, sep, after = fmt.prompt_from_text("SFTUNEPROMPT").partition("SFTUNEPROMPT")
        if not sep:
            return None
        return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after) + "{{ .Response }}"
    p = chat_pieces(fmt, getattr(fmt, "tokenizer", None))
    if p is None:
        return None
    L = _go_literal
    role = (f'{{{{ if eq .Role "user" }}}}{L(p.user_pre)}{{{{ .Content }}}}{L(p.user_post)}'
            f'{{{{ else if eq .Role "assistant" }}}}{L(p.assistant_pre)}{{{{ .Content }}}}{L(p.assistant_post)}')
    if p.system_pre is None:
        return f"{L(p.preamble)}{{{{ range .Messages }}}}{role}{{{{ end }}}}{{{{ end }}}}{L(p.generation)}"
    preamble = ('{{ $sys := false }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $sys = true }}{{ end }}{{ end }}'
                f"{{{{ if not $sys }}}}{L(p.preamble)}{{{{ end }}}}") if p.preamble else ""
    return (f"{preamble}{{{{ range .Messages }}}}"
            f'{{{{ if eq .Role "system" }}}}{L(p.system_pre)}{{{{ .Content }}}}{L(p.system_post)}{{{{ else }}}}'
            f"{role}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}{L(p.generation)}")


def _quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def write_modelfile(out_dir: Path, gguf_name: str, tokenizer, fmt: Format, *, header: str = "") -> Path:
    """``Modelfile`` beside the GGUF: ``FROM``, the run's prompt format as ``TEMPLATE``, and its stop tokens."""
    lines = [f"# {line}" for line in header.splitlines()] + [f"FROM ./{gguf_name}"]
    template = ollama_template(fmt)
    if template is None:
        from sftune.console import console

        console.print("[yellow]warning:[/] Modelfile: the chat template is not one a simple Ollama TEMPLATE can "
                      "reproduce; none written (Ollama will pick one from the GGUF's chat template)")
        lines.append("# no TEMPLATE: the chat template cannot be expressed as a simple Ollama template")
    elif '"""' in template:
        raise SftuneError('Modelfile: the prompt format contains """, which a Modelfile cannot quote')
    else:
        lines.append(f'TEMPLATE """{template}"""')
    for sid in fmt.stop_ids(tokenizer):
        lines.append(f"PARAMETER stop {_quoted(tokenizer.decode([sid], skip_special_tokens=False))}")
    path = Path(out_dir) / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
