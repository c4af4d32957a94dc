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
from sftune.data.chain import prepare
from sftune.data.mixture import fill_trained
from sftune.data.packing import BatchPlan
from sftune.data.stream import first_units
from sftune.data.pipeline import describe_plan
from sftune.data.tokenize import IGNORE
from sftune.data.vision_batch import images_of
from sftune.errors import SftuneError
from sftune.model import load_model_config, load_tokenizer, resolve_max_length
from sftune.console import console, out


OPEN, CLOSE = "«", "»"  # trained-token marks when there is no colour


def plain_output(console) -> bool:
    """No colour reaches the reader: marks instead of styles."""
    return not console.is_terminal or console.no_color or console.color_system is None


def token_pieces(tokenizer, ids) -> list[str]:
    """Each token decoded on its own, as the preview shows it (the dashboard's preview too)."""
    return [tokenizer.decode([int(t)], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids]


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


def preview_sequences(cfg: Config, n: int = 3):
    """The tokenizer, the data (with its report) and the first ``n`` training sequences exactly as
    training builds them: dicts of ``input_ids``, ``labels``, ``weights``, ``position_ids``, ``rows``."""
    tokenizer, _ = load_tokenizer(cfg)
    try:
        model_config = load_model_config(cfg)
    except SftuneError:
        model_config = None  # preview works without the model; max_length then comes from the tokenizer
    max_length = resolve_max_length(cfg, tokenizer, model_config)
    data = prepare(cfg.data, tokenizer, max_length, seed=cfg.train.seed)
    plan = BatchPlan.build(data.train.lengths, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                           packing=cfg.data.packing, max_length=max_length, seed=cfg.train.seed)
    describe_plan(data.report, plan)
    fill_trained(data.report, plan, data.train, plan.total_steps(cfg.train.max_steps, cfg.train.epochs))

    rows_shown = [plan.units[u] for u in training_order(plan, n)]
    if cfg.data.streaming:  # the stream's own first sequences
        data.train, rows_shown = first_units(cfg, tokenizer, max_length, n)
    names = [s["label"] for s in data.report.sources] or [data.report.source]
    mixed = hasattr(data.train, "source")  # a mixture, or a stream's first window
    sequences = []
    for row in rows_shown:
        ids, labels, weights, positions, rows, images = [], [], [], [], [], []
        for i in row:
            e_ids, e_labels = data.train.example(i)
            extras = data.train.extras(i) if getattr(data.train, "has_extras", False) else {}
            images += [{**im, "start": im["start"] + len(ids)} for im in images_of(extras.get("images"))]
            ids += e_ids.tolist()
            labels += e_labels.tolist()
            weights += [round(float(w), 4) for w in data.train.example_weights(i)]
            positions += list(range(len(e_ids)))
            rows.append(int(data.train.rows[i]))
        sources = [names[int(data.train.source[i])] if mixed else names[0] for i in row]
        sequences.append({"input_ids": ids, "labels": labels, "weights": weights, "position_ids": positions,
                          "rows": rows, "source": sources[0] if len(set(sources)) == 1 else sources,
                          **({"images": images} if images else {})})
    return tokenizer, data, sequences


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


def training_order(plan: BatchPlan, n: int) -> list[int]:
    """The first ``n`` units (sequences) in the order training meets them: the first steps of the
    first epoch, each step's micro-batches in turn (one process)."""
    units: list[int] = []
    for step in plan.epoch_steps(0):
        for micro in plan.micro_batches(step):
            units += micro
        if len(units) >= n:
            break
    return units[:n]


def preview(cfg: Config, n: int = 3, as_json: bool = False) -> None:
    tokenizer, data, sequences = preview_sequences(cfg, n)
    for r, seq in enumerate(sequences):
        ids, labels, weights, positions, rows = (seq[k] for k in ("input_ids", "labels", "weights", "position_ids",
                                                                  "rows"))
        if as_json:
            extra = {"weights": weights} if data.train.weighted else {}
            out.print(json.dumps({"input_ids": ids, "labels": labels, "position_ids": positions, **extra,
                                  "text": tokenizer.decode(ids, skip_special_tokens=False,
                                                           clean_up_tokenization_spaces=False),
                                  "rows": rows, "source": seq["source"],
                                  **({"images": seq["images"]} if "images" in seq else {})}),
                      markup=False, highlight=False)
        else:
            trained = sum(lab != IGNORE for lab in labels)
            console.rule(f"sequence {r}: rows {escape(str(rows))}, {len(ids)} tokens, {trained} trained")
            console.print(colored(tokenizer, ids, labels, weights, plain=plain_output(console),
                                  images=seq.get("images", ())))
            tools = tool_summary(tokenizer, data.fmt, data.source, seq)
            if tools:
                console.print(f"[dim]{escape(tools)}[/]")
    if not as_json:
        weighted = data.train.weighted
        if plain_output(console):
            console.print(f"legend: {OPEN}trained tokens{CLOSE}, unmarked: masked tokens (no loss)", markup=False)
        else:
            extra = " [bold yellow]trained with a message weight other than 1[/]" if weighted else ""
            console.print(f"[dim]legend:[/] [bold green]trained tokens[/]{extra} [dim]masked tokens (no loss)[/]")
    data.report.render(console, title="Training data")
    if data.eval_report is not None:
        data.eval_report.render(console, title="Eval data")
