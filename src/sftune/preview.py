"""``sftune preview``: training sequences as the model sees them, and the dataset report.

Trained tokens (labels != -100) are shown in green, masked tokens dimmed; without colour (output not
a terminal, or ``NO_COLOR``) each run of trained tokens is marked ``«…»`` instead. ``--json`` prints one
object per training sequence in training order, ``{"input_ids", "labels", "position_ids", "text", "rows",
"source"}``, on stdout; this shape is stable so other tools can check masks against it. ``source`` is
the label of the source the sequence came from (a list parallel to ``rows`` when packing put examples
of several sources in one sequence). Image conversations (vision-language models) show each image as
one placeholder with its size and token count instead of its tokens; ``--json`` adds ``"images"``:
each image's first token, token count and ``[width, height]``.
"""

from __future__ import annotations

import json

from rich.markup import escape
from rich.text import Text

from sftune.config import Config
from sftune.data.chain import plan, prepare
from sftune.data.tokenize import IGNORE
from sftune.data.vision_batch import images_of
from sftune.errors import SftuneError
from sftune.speedups import bucket_for
from sftune.model import load_model_config, load_tokenizer, resolve_max_length
from sftune.console import console, out


OPEN, CLOSE = "«", "»"  # trained-token marks when there is no colour
MAX_CHAR_TOKENS = 8
"""Tokens one character may span (UTF-8 needs at most 4 bytes; byte-level BPE at most one token per byte)."""


def plain_output(console) -> bool:
    """No colour reaches the reader: marks instead of styles."""
    return not console.is_terminal or console.no_color or console.color_system is None


def token_pieces(tokenizer, ids) -> list[str]:
    """The text of each token, as the preview shows it (the dashboard's preview too). A character
    whose bytes span several tokens (``Où``, ``日本語``, ``😀`` in GPT-2) is decoded from the run of
    tokens that holds it and shown at its last token (the others show ``""``), so the pieces join
    to the decoded text instead of ``�``."""
    pieces, start = [], 0
    for i in range(len(ids)):
        text = tokenizer.decode([int(t) for t in ids[start:i + 1]], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < MAX_CHAR_TOKENS:
            pieces.append("")  # an incomplete character: wait for its next byte's token
            continue
        pieces.append(text)
        start = i + 1
    return pieces


def colored(tokenizer, ids, labels, weights=None, plain: bool = False, images=()) -> Text:
    """Trained tokens green (yellow where a message's weight is not 1), masked tokens dim; with
    ``plain``, trained runs are also marked «…» so the text reads without colour. ``images``
    (``{"start", "tokens", "size"}``): each image's tokens shown as one placeholder."""
    text = Text()
    weights = [1.0] * len(ids) if weights is None else weights
    trained_run = False
    starts = {im["start"]: im for im in images}
    skip = 0
    for k, (piece, lab, w) in enumerate(zip(token_pieces(tokenizer, ids), labels, weights)):
        if k in starts:
            im = starts[k]
            skip = im["tokens"]
            text.append(f"[image {im['size'][0]}x{im['size'][1]}, {im['tokens']} tokens]", style="magenta")
        if skip:
            skip -= 1
            continue
        piece = piece.replace("\n", "↵\n")
        trained = lab != IGNORE
        if plain and trained != trained_run:
            text.append(OPEN if trained else CLOSE)
            trained_run = trained
        text.append(piece, style="dim" if not trained else "bold green" if w == 1 else "bold yellow")
    if plain and trained_run:
        text.append(CLOSE)
    return text


def preview_sequences(cfg: Config, n: int = 3, *, layout: str = "rows", world: int = 1):
    """The tokenizer, the data (with its report) and the first ``n`` training sequences exactly as
    training builds them (:mod:`sftune.data.chain`: the same two functions): the rows of the first
    steps' micro-batches in training order, packing and ``layout`` included (``rows`` unless given:
    the model's probe may choose ``flat``, which puts a micro-batch's rows in one), ``train.bucket``
    and ``world`` ranks' shares together. Dicts of ``input_ids``, ``labels``, ``weights``,
    ``position_ids``, ``rows``, ``source``, ``step``."""
    tokenizer, _ = load_tokenizer(cfg)
    try:
        model_config = load_model_config(cfg)
    except SftuneError:
        model_config = None  # preview works without the model; max_length then comes from the tokenizer
    max_length = resolve_max_length(cfg, tokenizer, model_config)
    data = prepare(cfg.data, tokenizer, max_length, seed=cfg.train.seed)
    feed = plan(cfg, data, tokenizer.pad_token_id, layout=layout, world=world, training=False,
                hidden_size=getattr(model_config, "hidden_size", 768), bucket=bucket_for(cfg))
    names = [s["label"] for s in data.report.sources] or [data.report.source]
    sequences: list[dict] = []
    step = 0
    while len(sequences) < n and (feed.streamed or step < feed.total_steps):
        examples, micro = feed.rows(step)
        for row in (row for rows in micro for row in rows):
            sequences.append(sequence(examples, row, names, step))
        step += 1
    return tokenizer, data, sequences[:n]


def sequence(examples, row: list[int], names: list[str], step: int) -> dict:
    """One row of a micro-batch as preview shows it (the examples of ``row`` one after another)."""
    ids, labels, weights, positions, images = [], [], [], [], []
    for i in row:
        e_ids, e_labels = examples.example(i)
        extras = examples.extras(i) if getattr(examples, "has_extras", False) else {}
        images += [{**im, "start": im["start"] + len(ids)} for im in images_of(extras.get("images"))]
        ids += e_ids.tolist()
        labels += e_labels.tolist()
        weights += [round(float(w), 4) for w in examples.example_weights(i)]
        positions += list(range(len(e_ids)))
    sources = [names[int(examples.source[i])] for i in row]
    return {"input_ids": ids, "labels": labels, "weights": weights, "position_ids": positions,
            "rows": [int(examples.rows[i]) for i in row], "source": sources[0] if len(set(sources)) == 1 else sources,
            "step": step, **({"images": images} if images else {})}


def tool_summary(tokenizer, fmt, source, seq) -> str | None:
    """For chat rows with tools: where the schemas went (masked context tokens) and how many
    trained turns call a tool. ``None`` when the sequence's rows have no tools."""
    tools_column = getattr(fmt, "tools_column", None)
    ds = getattr(source, "train", None)
    if not tools_column or ds is None or tools_column not in ds.column_names:
        return None
    from sftune.data.tools import parse_tools

    names = []
    for r in seq["rows"]:
        if r < len(ds) and ds[r].get("__row__", r) == r:
            try:
                names += [(t.get("function") or t).get("name") for t in parse_tools(ds[r][tools_column], "tools") or []]
            except Exception:  # noqa: BLE001 - a row the report already counts as bad
                continue
    names = sorted({n for n in names if isinstance(n, str) and n})
    if not names:
        return None
    pieces = token_pieces(tokenizer, seq["input_ids"])
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    text = "".join(pieces)
    labels = seq["labels"]
    first = next((k for k, lab in enumerate(labels) if lab != IGNORE), len(labels))
    limit = starts[first] if first < len(starts) else len(text)
    at = [text.find(n) for n in names]
    at = [a for a in at if 0 <= a < limit]
    import bisect

    if at:
        before = text[:min(at)].rsplit("\n", 3)
        where = (f"in the context, no loss (from token {bisect.bisect_right(starts, min(at)) - 1}, after "
                 f"{chr(10).join(before[-3:])[-60:]!r})")
    else:
        where = "not in the rendered context"
    runs, k = [], 0
    while k < len(labels):
        if labels[k] != IGNORE:
            j = k
            while j < len(labels) and labels[j] != IGNORE:
                j += 1
            runs.append("".join(pieces[k:j]))
            k = j
        else:
            k += 1
    calls = sum(any(n in r for n in names) for r in runs)
    return f"tools {', '.join(names)}: schemas {where}; {calls} of {len(runs)} trained turns call a tool"


def preview(cfg: Config, n: int = 3, as_json: bool = False) -> None:
    """``sftune preview``: the view (sequences, legend, report) is the command's output, on stdout;
    with ``--json`` the sequences are, one object a line, and the report goes to stderr."""
    tokenizer, data, sequences = preview_sequences(cfg, n)
    view = console if as_json else out
    plain = plain_output(view)
    weighted = data.train.weighted or any(w not in (0.0, 1.0) for seq in sequences for w in seq["weights"])
    for r, seq in enumerate(sequences):
        ids, labels, weights, positions, rows = (seq[k] for k in ("input_ids", "labels", "weights", "position_ids",
                                                                  "rows"))
        if as_json:
            extra = {"weights": weights} if weighted else {}
            out.print(json.dumps({"input_ids": ids, "labels": labels, "position_ids": positions, **extra,
                                  "text": tokenizer.decode(ids, skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False),
                                  "rows": rows, "source": seq["source"],
                                  **({"images": seq["images"]} if "images" in seq else {})}),
                      markup=False, highlight=False)
        else:
            trained = sum(lab != IGNORE for lab in labels)
            view.rule(f"sequence {r} (step {seq['step']}): rows {escape(str(rows))}, {len(ids)} tokens, "
                      f"{trained} trained")
            view.print(colored(tokenizer, ids, labels, weights, plain=plain, images=seq.get("images", ())))
            tools = tool_summary(tokenizer, data.fmt, data.source, seq)
            if tools:
                view.print(f"[dim]{escape(tools)}[/]")
    if not as_json:
        if plain:
            view.print(f"legend: {OPEN}trained tokens{CLOSE}, unmarked: masked tokens (no loss)", markup=False)
        else:
            extra = " [bold yellow]trained with a message weight other than 1[/]" if weighted else ""
            view.print(f"[dim]legend:[/] [bold green]trained tokens[/]{extra} [dim]masked tokens (no loss)[/]")
    data.report.render(view, title="Training data")
    if data.eval_report is not None:
        data.eval_report.render(view, title="Eval data")
