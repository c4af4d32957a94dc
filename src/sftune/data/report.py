"""The dataset report: what was read, kept, skipped and truncated, and what the batches look like.

Nothing is dropped silently: every skipped or truncated example is counted here, with its reason
and the first few row numbers, and the report is printed by ``sftune preview`` and ``sftune train``
and saved in the run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.markup import escape
from rich.table import Table


@dataclass
class DataReport:
    source: str
    format: str
    split: str
    max_length: int
    rows_read: int = 0
    """Rows in the split as loaded."""
    rows_used: int = 0
    """Rows formatted (after limit and the eval split)."""
    kept: int = 0
    """Training sequences kept (a chat row can give several; see ``expanded``)."""
    kept_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_rows: dict[str, list[int]] = field(default_factory=dict)
    truncated: int = 0
    truncated_rows: list[int] = field(default_factory=list)
    length_percentiles: dict[str, int] = field(default_factory=dict)
    total_tokens: int = 0
    loss_tokens: int = 0
    eos_not_trained: int = 0
    expanded_rows: int = 0
    """Conversations trained as several sequences, one per assistant turn the chat template does not
    render as a prefix of the whole conversation."""
    expanded_sequences: int = 0
    """Sequences added by that expansion."""
    expanded_tokens: int = 0
    """Their tokens: what the expansion costs."""
    expanded_why: dict[str, int] = field(default_factory=dict)
    straddled: int = 0
    """Examples in which a token straddled the prompt/completion boundary: the prompt was tokenized
    exactly as at inference and the completion as its continuation."""
    notes: dict[str, int] = field(default_factory=dict)
    note_rows: dict[str, list[int]] = field(default_factory=dict)
    sequences: int = 0
    """Training sequences after packing (equal to ``kept`` without packing)."""
    packing: bool = False
    fill: float = 0.0
    """Real tokens / (sequences x max_length) when packing; real / padded batch tokens otherwise."""
    model_check: dict = field(default_factory=dict)
    """The start-up equivalence probe (``sftune.probe``): the row layout and loss chosen for the
    model, whether they matched the model run one example at a time, and its ``line``."""
    images: dict = field(default_factory=dict)
    """Vision-language data: images in the kept examples, examples with images, image tokens and
    tokens per image (min / mean / max; ``data.image_max_pixels`` changes them)."""
    streamed: bool = False
    """The data is streamed (``data.streaming``): the counts are what the run read and trained so far."""
    sources: list[dict] = field(default_factory=list)
    """Per source of a mixture (``data.sources``): label, path, target share, rows read / used /
    kept, skipped (why), truncated, draws per epoch, and (from the batch plan) examples and tokens
    trained, passes and the achieved share of the run's examples."""

    @property
    def loss_fraction(self) -> float:
        return self.loss_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_fraction"] = round(self.loss_fraction, 4)
        d["eos_trained_everywhere"] = self.eos_not_trained == 0
        return d

    @classmethod
    def from_columns(cls, *, source, fmt, split, max_length, rows_read, lengths, n_loss, truncated,
                     eos_trained, skip, rows, extra=None, straddled=None, notes=None) -> "DataReport":
        rows = np.asarray(rows)
        rep = cls(source=source, format=fmt, split=split, max_length=max_length, rows_read=rows_read,
                  rows_used=int(len(np.unique(rows))))
        skip = np.asarray(skip, dtype=object)
        kept = skip == ""
        rep.kept_rows = int(len(np.unique(rows[kept])))
        if extra is not None:
            extra = np.asarray(extra, dtype=bool) & kept
            rep.expanded_rows = int(len(np.unique(rows[extra])))
            rep.expanded_sequences = int(extra.sum())
            rep.expanded_tokens = int(np.asarray(lengths)[extra].sum())
            if notes is not None:
                for why in np.asarray(notes, dtype=object)[extra].tolist():
                    rep.expanded_why[why] = rep.expanded_why.get(why, 0) + 1
        if straddled is not None:
            rep.straddled = int((np.asarray(straddled, dtype=bool) & kept).sum())
        if notes is not None:
            notes = np.asarray(notes, dtype=object)
            plain = kept & (notes != "") & (~extra if extra is not None else True)
            for note in sorted(set(notes[plain].tolist())):
                sel = plain & (notes == note)
                rep.notes[note] = int(sel.sum())
                rep.note_rows[note] = rows[sel][:5].tolist()
        for reason in sorted(set(skip[~kept].tolist())):
            sel = skip == reason
            rep.skipped[reason] = int(sel.sum())
            rep.skipped_rows[reason] = rows[sel][:5].tolist()
        lengths = np.asarray(lengths)[kept]
        truncated = np.asarray(truncated, dtype=bool)[kept]
        rep.kept = int(kept.sum())
        rep.truncated = int(truncated.sum())
        rep.truncated_rows = rows[kept][truncated][:5].tolist()
        rep.total_tokens = int(lengths.sum())
        rep.loss_tokens = int(np.asarray(n_loss)[kept].sum())
        eos = np.asarray(eos_trained, dtype=bool)[kept]
        rep.eos_not_trained = int((~eos & ~truncated).sum())  # a truncated example has no end to learn
        if len(lengths):
            for q in (50, 90, 99):
                rep.length_percentiles[f"p{q}"] = int(np.percentile(lengths, q))
            rep.length_percentiles["max"] = int(lengths.max())
            rep.length_percentiles["min"] = int(lengths.min())
        return rep

    def render(self, console, title: str = "Dataset report") -> None:
        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column()
        t.add_row("source", escape(f"{self.source} [{self.split}] as {self.format}"))
        kept = f"{self.kept} kept" if self.kept == self.kept_rows else \
            f"{self.kept_rows} kept as {self.kept} sequences"
        if self.streamed and not self.rows_read:  # before the first step: nothing read yet
            t.add_row("rows", "streamed: counted as the run reads them (its report has the totals)")
            console.print(t)
            if self.sources:
                console.print(source_table(self.sources))
            return
        t.add_row("rows", f"{self.rows_read} read, {self.rows_used} used, {kept}")
        if self.expanded_rows:
            why = "; ".join(escape(w) for w in self.expanded_why)
            t.add_row("expanded", f"[yellow]{self.expanded_rows}[/] conversations trained turn by turn "
                      f"(+{self.expanded_sequences} sequences, +{self.expanded_tokens:,} tokens): {why}")
        if self.straddled:
            t.add_row("boundaries", f"{self.straddled} examples had a token across the prompt/completion "
                      "boundary: the prompt is tokenized as at inference, the completion as its continuation")
        for note, n in self.notes.items():
            if note != "a token straddles the prompt/completion boundary":
                t.add_row("note", f"{n} {escape(note)} (rows {', '.join(map(str, self.note_rows[note]))}"
                          f"{', …' if n > 5 else ''})")

        if self.skipped:
            for reason, n in self.skipped.items():
                t.add_row("skipped", f"[yellow]{n}[/] {escape(reason)} (rows {', '.join(map(str, self.skipped_rows[reason]))}"
                          f"{', …' if n > 5 else ''})")
        else:
            t.add_row("skipped", "0")
        trunc = f"{self.truncated} (tail cut at max_length={self.max_length})"
        if self.truncated:
            trunc = f"[yellow]{self.truncated}[/] cut at max_length={self.max_length} (rows " \
                    f"{', '.join(map(str, self.truncated_rows))}{', …' if self.truncated > 5 else ''})"
        t.add_row("truncated", trunc)
        if self.images:
            im, per = self.images, self.images["tokens_per_image"]
            t.add_row("images", f"{im['images']:,} in {im['examples']:,} examples, {im['image_tokens']:,} tokens "
                      f"(per image: min {per['min']}, mean {per['mean']}, max {per['max']}; never trained)")
        if self.length_percentiles:
            p = self.length_percentiles
            t.add_row("tokens/example", f"p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}")
        t.add_row("tokens", f"{self.total_tokens:,} total, {self.loss_tokens:,} with loss "
                  f"({100 * self.loss_fraction:.1f}%)")
        every = "every untruncated example (a cut example has no end)" if self.truncated else "every example"
        eos = f"[green]yes[/], {every}" if self.eos_not_trained == 0 else \
            f"[red]no[/]: {self.eos_not_trained} untruncated examples end without a trained EOS/end-of-turn"
        t.add_row("EOS trained", eos)
        if self.packing:
            t.add_row("packing", f"{self.kept} examples in {self.sequences} sequences, "
                      f"{100 * self.fill:.1f}% of tokens are real")
        elif self.sequences:
            how = "one example per row" if self.model_check.get("layout") == "per_example" else \
                "each micro-batch is packed into rows, padding-free"
            t.add_row("padding", f"{100 * (1 - self.fill):.1f}% of batch tokens are padding ({how})")
        if self.model_check.get("line"):
            t.add_row("model check", escape(self.model_check["line"].removeprefix("model check: ")))
        console.print(t)
        if self.sources:
            console.print(source_table(self.sources))


SOURCE_WIDTH = 24
"""The per-source table's source column (characters): the table fits an 80-column terminal."""


def short_labels(sources: list[dict]) -> list[str]:
    """Each source as the table shows it: its label, or for a source labelled by its path the file
    name (the full path unless two sources share a name; the JSON report keeps ``path``)."""
    names = [Path(s["label"]).name if s["label"] == s.get("path") else s["label"] for s in sources]
    return [n if names.count(n) == 1 else s["label"] for n, s in zip(names, sources)]


def source_table(sources: list[dict]) -> Table:
    """Per source of a mixture: the accounting, and the achieved share beside the target."""
    t = Table(title="Sources (achieved: share of the examples this run trains)", title_justify="left")
    for col in ("source", "target", "achieved", "read", "kept", "skipped", "cut", "trained", "tokens", "passes"):
        if col == "source":
            t.add_column(col, justify="left", overflow="ellipsis", no_wrap=True, max_width=SOURCE_WIDTH)
        else:
            t.add_column(col, justify="right", overflow="fold")
    for s, name in zip(sources, short_labels(sources)):
        achieved = s.get("achieved_share", s["share_per_epoch"])
        t.add_row(escape(name), f"{100 * s['target_share']:.1f}%", f"{100 * achieved:.1f}%",
                  str(s["rows_read"]), str(s["kept"]), str(sum(s["skipped"].values())), str(s["truncated"]),
                  str(s.get("examples_trained", "-")), f"{s.get('tokens_trained', 0):,}", f"{s.get('passes', 0):g}")
    return t
