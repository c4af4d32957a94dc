"""Unit tests of sftune.data.report: the per-split counts (kept, skipped with their rows, truncated,
EOS not trained, expanded chats, notes) and what the report prints."""

from sftune.console import console
from sftune.data.report import DataReport


def report(**over):
    cols = dict(source="f.jsonl", fmt="prompt_completion", split="train", max_length=8, rows_read=5,
                lengths=[8, 5, 3, 0, 6], n_loss=[3, 2, 1, 0, 2], truncated=[True, False, False, False, False],
                eos_trained=[False, True, False, False, True], skip=["", "", "", "empty completion", ""],
                rows=[0, 1, 2, 3, 4])
    cols.update(over)
    return DataReport.from_columns(**cols)


def test_counts_and_rows_of_every_skip_and_cut():
    rep = report()
    assert (rep.rows_used, rep.kept, rep.kept_rows, rep.truncated, rep.truncated_rows) == (5, 4, 4, 1, [0])
    assert rep.skipped == {"empty completion": 1} and rep.skipped_rows == {"empty completion": [3]}
    assert (rep.total_tokens, rep.loss_tokens, rep.eos_not_trained) == (22, 8, 1)  # row 2; row 0 is truncated
    d = rep.to_dict()
    assert d["loss_fraction"] == round(8 / 22, 4) and d["eos_trained_everywhere"] is False
    assert rep.length_percentiles["max"] == 8 and rep.length_percentiles["min"] == 3


def test_expanded_chats_and_notes_are_counted_apart():
    rep = report(rows=[0, 0, 1, 2, 3], extra=[False, True, False, False, False],
                 notes=["", "not prefix-stable", "", "", "template twice"], skip=["", "", "", "", ""])
    assert (rep.expanded_rows, rep.expanded_sequences, rep.expanded_tokens) == (1, 1, 5)
    assert rep.expanded_why == {"not prefix-stable": 1}
    assert rep.notes == {"template twice": 1} and rep.note_rows == {"template twice": [3]}


def test_render_names_the_source_and_the_skips():
    with console.capture() as cap:
        report().render(console, title="Training data")
    text = cap.get()
    assert "Training data" in text and "f.jsonl [train]" in text and "empty completion" in text


def test_source_table_fits_80_columns_with_long_paths():
    """Long paths show as their file name, one line per source; the JSON keeps the path."""
    from rich.console import Console

    from sftune.data.report import short_labels, source_table

    deep = "/very/long/directory/name/that/goes/on/and/on/for/a/while/data/"
    sources = [{"label": deep + "train_conversations.jsonl", "path": deep + "train_conversations.jsonl",
                "target_share": 0.5, "share_per_epoch": 0.5, "rows_read": 10, "kept": 10, "skipped": {},
                "truncated": 0},
               {"label": "code", "path": deep + "code.jsonl", "target_share": 0.5, "share_per_epoch": 0.5,
                "rows_read": 10, "kept": 10, "skipped": {}, "truncated": 0}]
    assert short_labels(sources) == ["train_conversations.jsonl", "code"]
    console = Console(width=80, record=True, file=open("/dev/null", "w"))
    console.print(source_table(sources))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum("train_conversations" in line for line in lines) == 1 and sum("code" in line for line in lines) == 1
