"""Unit tests of sftune.preview: the first training sequences as the model sees them, trained tokens
marked (colour on a terminal, guillemets without one)."""

import re

from sftune.cli import main


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_preview_marks_trained_tokens_without_colour(capsys):
    code, _, err = run_cli(["preview", "quickstart", "data.limit=10", "-n", "1"], capsys)
    assert code == 0, err
    assert re.search(r"A:« \S+<\|endoftext\|>»", err) and "legend: «trained tokens»" in err


def test_colored_marks_trained_runs_and_weights(tiny_tokenizer):
    from sftune.preview import colored, token_pieces

    ids = tiny_tokenizer("Hello world", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    labels = [-100] * (len(ids) - 2) + ids[-2:]
    assert "".join(token_pieces(tiny_tokenizer, ids)) == "Hello world<|endoftext|>"
    plain = colored(tiny_tokenizer, ids, labels, plain=True)
    assert plain.plain.endswith("«" + "".join(token_pieces(tiny_tokenizer, ids[-2:])) + "»")
    styled = colored(tiny_tokenizer, ids, labels, weights=[1.0] * (len(ids) - 1) + [0.5])
    assert "«" not in styled.plain and [s.style for s in styled.spans][-2:] == ["bold green", "bold yellow"]


def test_preview_sequences_are_the_training_rows(tiny_model_dir, qa_rows_file):
    from sftune.config import load_config
    from sftune.preview import preview_sequences

    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(qa_rows_file), "data.template": "qa",
                             "data.packing": False})
    tokenizer, data, seqs = preview_sequences(cfg, n=2)
    rows = [int(r) for r in data.train.rows]
    assert len(seqs) == 2
    for seq in seqs:  # in training order: each one example (no packing), as the loop builds it
        (row,) = seq["rows"]
        ids, labels = data.train.example(rows.index(row))
        assert seq["input_ids"] == ids.tolist() and seq["labels"] == labels.tolist()
        assert seq["position_ids"] == list(range(len(ids))) and seq["labels"][-1] == tokenizer.eos_token_id


def test_preview_shows_an_image_as_one_placeholder(vlm, tmp_path, capsys):
    """Each image is one «[image WxH, N tokens]» placeholder; --json keeps its shape plus "images"."""
    import json

    import vision_models

    data = vision_models.write_data(tmp_path, n=3)
    args = ["preview", "--json", "-n", "3", f"model.path={vlm('qwen2_vl')}", f"data.path={data}", "data.packing=true"]
    recipe = tmp_path / "v.yaml"
    recipe.write_text("train:\n  batch_size: 4\n")
    code, out, err = run_cli(["preview", str(recipe), "-n", "1", *args[4:]], capsys)
    assert code == 0, err
    assert re.search(r"\[image 56x56, 6 tokens\]What colour", err) and "<|image_pad|>" not in err
    assert re.search(r"images +│ 4 in 3 examples", err)
    code, out, err = run_cli(["preview", str(recipe), *args[1:]], capsys)
    (seq,) = [json.loads(line) for line in out.splitlines()]  # 3 short rows packed into one sequence
    assert set(seq) >= {"input_ids", "labels", "position_ids", "text", "rows", "source", "images"}
    pad = seq["input_ids"][seq["images"][0]["start"] + 1]
    assert [seq["input_ids"][im["start"] + 1: im["start"] + im["tokens"] - 1].count(pad) for im in seq["images"]] == \
           [im["tokens"] - 2 for im in seq["images"]]
    assert sorted(im["size"][0] * im["size"][1] for im in seq["images"]) == [28 * 56, 28 * 56, 56 * 56, 56 * 56]
