"""The run report: ``output_dir/report.md`` with PNG plots, rebuilt any time by ``sftune report RUN``
(the data report is :mod:`sftune.data.report`).

Everything comes from the files a run writes: ``metrics.jsonl`` (train and eval records, sample
generations), ``data_report.json`` (kept / skipped / truncated) and ``final_metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftune.errors import SftuneError
from sftune.console import read_metrics


def _plot(path: Path, title: str, ylabel: str, series: list[tuple[str, list, list]], logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, xs, ys in series:
        if xs and label == "loss spike":
            ax.plot(xs, ys, "x", color="red", markersize=9, label=label)
        elif xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table(rows: list[tuple[str, str]]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "↵")


def _sample_order(rec: dict) -> tuple:
    """"before training" first, then the evaluations in step order, "after training" last."""
    label = rec.get("label", "")
    return (0 if label == "before training" else 2 if label == "after training" else 1, rec.get("step", 0))


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path."""
    run = Path(run_dir)
    records = read_metrics(run)
    if not records:
        raise SftuneError(f"{run} has no metrics.jsonl: give a training output directory")
    train = [r for r in records if "loss" in r and "step" in r]
    evals = [r for r in records if "eval_loss" in r and not r.get("final")]
    samples = sorted((r for r in records if "samples" in r), key=_sample_order)
    spikes = [r for r in records if r.get("spike")]  # sftune.spikes

    plots = []
    steps = [r["step"] for r in train]
    _plot(run / "loss.png", "Loss", "loss (per token)",
          [("train", steps, [r["loss"] for r in train]),
           ("eval", [r["step"] for r in evals], [r["eval_loss"] for r in evals]),
           ("loss spike", [r["step"] for r in spikes], [r["spike_loss"] for r in spikes])])
    plots.append(("Loss", "loss.png"))
    from sftune.distill.objective import DISTILL_SERIES, distill_lines  # (imports torch: only when reporting)

    if any("distill_loss" in r for r in train):  # a distillation run (sftune.distill): its parts and the teacher
        _plot(run / "distill.png", "Distillation", "per token", [(name, [r["step"] for r in train if key in r],
              [r[key] for r in train if key in r]) for name, key in DISTILL_SERIES])
        plots.append(("Distillation", "distill.png"))
    _plot(run / "lr.png", "Learning rate", "learning rate", [("lr", steps, [r["lr"] for r in train])])
    plots.append(("Learning rate", "lr.png"))
    _plot(run / "throughput.png", "Throughput", "tokens / s (all non-padding tokens)",
          [("tokens/s", steps, [r.get("tokens_per_s", 0) for r in train])])
    plots.append(("Throughput", "throughput.png"))

    lines = [f"# Run report: {run.name}", ""]
    final = json.loads((run / "final_metrics.json").read_text()) if (run / "final_metrics.json").exists() else {}
    peak = max((r["peak_mem_gib"] for r in train if "peak_mem_gib" in r), default=None)  # CUDA runs only
    if final or peak is not None:
        rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in final.items() if v is not None]
        if peak is not None:
            rows.append(("peak GPU memory", f"{peak:.2f} GiB (torch.cuda.max_memory_allocated)"))
        lines += ["## Final metrics", "", _table(rows), ""]
    if spikes:
        lines += [f"## Loss spikes: {len(spikes)}", "", "| step | loss | why | action |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['spike_loss']:.4g} | {_md_escape(r['spike_why'])} | {r['spike_action']} |"
                  for r in spikes] + [""]
    lines += distill_lines(train)
    if (run / "data_report.json").exists():
        d = json.loads((run / "data_report.json").read_text())
        skipped = ", ".join(f"{n} {r}" for r, n in d.get("skipped", {}).items()) or "0"
        p = d.get("length_percentiles", {})
        rows = [("source", f"{d['source']} [{d['split']}] as {d['format']}"),
                ("rows", f"{d['rows_read']} read, {d['rows_used']} used, {d['kept']} kept"),
                ("skipped", skipped),
                ("truncated", f"{d['truncated']} (max_length {d['max_length']})"),
                ("tokens / example", f"p50 {p.get('p50')}, p90 {p.get('p90')}, p99 {p.get('p99')}, max {p.get('max')}"),
                ("tokens with loss", f"{d['loss_tokens']:,} of {d['total_tokens']:,} ({100 * d['loss_fraction']:.1f}%)"),
                ("EOS trained", ("yes, every untruncated example" if d.get("truncated") else "yes, every example")
                 if d.get("eos_trained_everywhere") else f"no: {d.get('eos_not_trained')} untruncated examples"),
                ("packing" if d.get("packing") else "padding",
                 f"{100 * d['fill']:.1f}% real tokens" if d.get("packing") else f"{100 * (1 - d['fill']):.1f}% padding")]
        if d.get("model_check", {}).get("line"):
            rows.append(("model check", d["model_check"]["line"].removeprefix("model check: ")))
        lines += ["## Training data", "", _table(rows), ""]
        if d.get("sources"):
            lines += ["## Sources", "", "| source | target | achieved | rows read | kept | skipped | truncated | "
                      "examples trained | tokens trained | passes |", "|---|---|---|---|---|---|---|---|---|---|"]
            for s in d["sources"]:
                skipped = ", ".join(f"{n} {why}" for why, n in s["skipped"].items()) or "0"
                lines.append(f"| {_md_escape(s['label'])} | {100 * s['target_share']:.1f}% | "
                             f"{100 * s.get('achieved_share', s['share_per_epoch']):.1f}% | {s['rows_read']} | "
                             f"{s['kept']} | {_md_escape(skipped)} | {s['truncated']} | {s.get('examples_trained', '-')} | "
                             f"{s.get('tokens_trained', 0):,} | {s.get('passes', 0):g} |")
            lines.append("")
    lines += ["## Plots", ""] + [f"![{t}]({f})" for t, f in plots] + [""]
    if samples:
        lines += ["## Sample generations", ""]
        for rec in samples:
            lines += [f"**{rec.get('label', 'step ' + str(rec['step']))}**", "", "| prompt | generated | expected |",
                      "|---|---|---|"]
            for s in rec["samples"]:
                lines.append(f"| {_md_escape(s['prompt'][-100:])} | {_md_escape(s['generated'])} | "
                             f"{_md_escape(s.get('reference') or '')} |")
            lines.append("")
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
