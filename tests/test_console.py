"""Unit tests of sftune.console: the plain progress lines of a piped run, the metric sinks, the
third-party noise filters."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import warnings

from sftune.console import PlainProgress, console, training_progress


def plain_lines(progress: PlainProgress, total: int, log_every: int) -> list[str]:
    """Drive ``progress`` as the loop does: a record every ``log_every`` steps (and at the last)."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        t = progress.add_task("train", total=total, completed=0, loss="-", lr="-", tps="-")
        for step in range(1, total + 1):
            if step % log_every == 0 or step == total:
                progress.update(t, loss=f"{1 / step:.4f}", lr="1.00e-03", tps="5,000")
            progress.update(t, completed=step)
    assert "\r" not in buf.getvalue()
    return buf.getvalue().splitlines()


def test_piped_progress_is_one_line_per_record():
    assert isinstance(training_progress(True), PlainProgress)  # pytest captures: not a terminal
    lines = plain_lines(PlainProgress(True, every_s=3600), total=40, log_every=5)
    assert [int(re.match(r"step (\d+)/40 ", line).group(1)) for line in lines] == list(range(5, 41, 5))
    assert re.fullmatch(r"step 5/40 \(12%\)  loss 0\.2000  lr 1\.00e-03  5,000 tok/s  elapsed \S+  ETA \S+", lines[0])
    assert console.file is not None


def test_heartbeat_only_between_records_further_apart_than_every_s():
    lines = plain_lines(PlainProgress(True, every_s=0), total=6, log_every=3)  # every step is "30 s" apart
    assert len(lines) == 6
    assert [("loss" in line) for line in lines] == [False, False, True, False, False, True]
    assert re.fullmatch(r"step 1/6 \(17%\)  elapsed \S+  ETA \S+", lines[0])  # a heartbeat: the step alone
    # the last step gets a line even when it carries no record (a skipped step)
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        p = PlainProgress(True, every_s=3600)
        t = p.add_task("train", total=3, completed=0, loss="-", lr="-", tps="-")
        for step in (1, 2, 3):
            p.update(t, completed=step)
    assert [line.split("  ")[0] for line in buf.getvalue().splitlines()] == ["step 3/3 (100%)"]


def test_disabled_progress_prints_nothing_and_resume_starts_at_its_step():
    assert plain_lines(PlainProgress(False, every_s=0), total=10, log_every=1) == []
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        p = PlainProgress(True, every_s=3600)
        t = p.add_task("train", total=10, completed=8, loss="-", lr="-", tps="-")
        p.update(t, completed=8)  # the resumed step itself: already printed by the first run
        p.update(t, loss="0.1", lr="1e-3", tps="1")
        p.update(t, completed=9)
    assert buf.getvalue().startswith("step 9/10 (90%)  loss 0.1")


def test_missing_extra_hint_keeps_the_extra_name(tmp_path, monkeypatch, capsys):
    from sftune.console import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    MetricsLogger(tmp_path, ["tensorboard", "wandb"], enabled=True)
    err = capsys.readouterr().err
    assert "pip install 'sftune[tensorboard]'" in err and "pip install 'sftune[wandb]'" in err


def test_metrics_logger_writes_json_lines_without_nan(tmp_path):
    from sftune.console import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, [], enabled=True)
    log.log({"step": 1, "loss": 2.5})
    log.log({"step": 2, "loss": float("nan")})
    MetricsLogger(tmp_path / "other", [], enabled=False).log({"step": 1})  # not the main process: nothing
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["loss"] is None and "time" in recs[0]
    assert not (tmp_path / "other").exists()


def test_resume_from_an_earlier_checkpoint_drops_abandoned_records(tmp_path):
    from sftune.console import read_metrics, truncate_metrics

    recs = [{"step": s, "loss": 1.0} for s in (100, 200, 300, 400)] + [{"step": 400, "final": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert truncate_metrics(tmp_path, 200) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [100, 200]


def test_third_party_noise_is_silenced(caplog):
    from sftune.console import quiet_third_party

    quiet_third_party()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("accelerate.utils.other").warning(
            "[RANK 0] Removed shared tensor {'model.lm_head.weight'} while saving. This should be OK")
        logging.getLogger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length for this model")
        logging.getLogger("accelerate.utils.other").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party.__globals__["_quieted"] = False  # re-install the filter inside this context
        quiet_third_party()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    assert not seen
