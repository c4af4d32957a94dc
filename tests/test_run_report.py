"""Unit tests of sftune.run_report: report.md from a run directory (plots, sample order and labels)."""

import json


def test_report_order_labels_and_eos_wording(tmp_path):
    from sftune.data.report import DataReport
    from sftune.run_report import build_report
    from sftune.console import console

    recs = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 100.0} for s in (1, 2)]
    sample = [{"prompt": "p", "generated": "g", "reference": "r"}]
    recs += [{"step": 2, "label": "step 2", "samples": sample}, {"step": 2, "label": "before training", "samples": sample},
             {"step": 2, "label": "after training", "samples": sample}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = DataReport.from_columns(source="f.json", fmt="prompt_completion", split="train", max_length=8, rows_read=2,
                                  lengths=[8, 5], n_loss=[3, 2], truncated=[True, False], eos_trained=[False, True],
                                  skip=["", ""], rows=[0, 1])
    (tmp_path / "data_report.json").write_text(json.dumps(rep.to_dict()))
    text = build_report(tmp_path).read_text()
    assert text.index("**before training**") < text.index("**step 2**") < text.index("**after training**")
    assert "yes, every untruncated example" in text
    with console.capture() as cap:
        rep.render(console)
    assert "every untruncated example" in cap.get()


def test_throughput_plot_label(tmp_path, monkeypatch):
    import sftune.run_report as report

    labels = []
    monkeypatch.setattr(report, "_plot", lambda path, title, ylabel, series, logy=False: labels.append(ylabel))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0}))
    report.build_report(tmp_path)
    assert "tokens / s (all non-padding tokens)" in labels and not any("trained tokens" in x for x in labels)


def test_loss_spikes_are_counted_and_plotted(tmp_path, monkeypatch):
    """A ``spike`` record (sftune.spikes): a section with its step, loss, rule and action; a point on the loss plot."""
    import sftune.run_report as report

    plotted = {}
    monkeypatch.setattr(report, "_plot", lambda path, title, ylabel, series, logy=False: plotted.update(
        {title: {label: (xs, ys) for label, xs, ys in series}}))
    recs = [{"step": s, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1.0} for s in (1, 2, 3)]
    recs.append({"step": 4, "spike": True, "spike_loss": 812.5, "spike_grad_norm": None, "spike_action": "skip",
                 "spike_why": "loss 812.5 > 3 x median 2 of the last 3 steps"})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = report.build_report(tmp_path).read_text()
    assert "## Loss spikes: 1" in text and "| 4 | 812.5 | loss 812.5 > 3 x median 2 of the last 3 steps | skip |" in text
    assert plotted["Loss"]["loss spike"] == ([4], [812.5])
