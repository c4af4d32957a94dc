"""Unit tests of sftune.preview: the first training sequences as the model sees them, trained tokens
marked (colour on a terminal, guillemets without one)."""

import re

import pytest

from conftest import train_config

from sftune.cli import main


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_preview_marks_trained_tokens_without_colour(capsys):
    """The view is the command's output: on stdout (``> file``, ``| less``), nothing of it on stderr."""
    code, out, err = run_cli(["preview", "quickstart", "data.limit=10", "-n", "1"], capsys)
    assert code == 0, err
    assert re.search(r"A:« \S+<\|endoftext\|>»", out) and "legend: «trained tokens»" in out
    assert "Training data" in out and "legend" not in err and "«" not in err


def test_characters_across_tokens_decode_whole(tiny_tokenizer):
    """Byte-level BPE splits a character's bytes over tokens: the pieces join to the text, no ``�``."""
    from sftune.preview import colored, token_pieces

    text = "Où Ωμέγα 日本語 😀 ｜ ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the characters really are split
    pieces = token_pieces(tiny_tokenizer, ids)
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert colored(tiny_tokenizer, ids, ids, plain=True).plain == "«" + text + "»"


def test_stream_preview_needs_no_max_steps(tiny_model_dir, qa_rows_file, capsys):
    """A stream previews without train.max_steps (nothing is trained); training still asks for it."""
    from sftune.config import load_config
    from sftune.data.chain import require_steps
    from sftune.errors import ConfigError

    code, out, err = run_cli(["preview", "codealpaca", f"model.path={tiny_model_dir}", f"data.path={qa_rows_file}",
                              "data.template=qa", "data.streaming=true", "-n", "1"], capsys)
    assert code == 0, err
    assert "streamed" in out
    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(qa_rows_file),
                             "data.streaming": True})
    with pytest.raises(ConfigError, match="train.max_steps"):
        require_steps(cfg)


def test_colored_marks_trained_runs_and_weights(tiny_tokenizer):
    from sftune.preview import colored, token_pieces

    ids = tiny_tokenizer("Hello world", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    labels = [-100] * (len(ids) - 2) + ids[-2:]
    assert "".join(token_pieces(tiny_tokenizer, ids)) == "Hello world<|endoftext|>"
    plain = colored(tiny_tokenizer, ids, labels, plain=True)
    assert plain.plain.endswith("«" + "".join(token_pieces(tiny_tokenizer, ids[-2:])) + "»")
    styled = colored(tiny_tokenizer, ids, labels, weights=[1.0] * (len(ids) - 1) + [0.5])
    assert "«" not in styled.plain and [s.style for s in styled.spans][-2:] == ["bold green", "bold yellow"]


@pytest.mark.parametrize("packing", [False, True])
def test_preview_sequences_are_the_first_steps_batches(tiny_model_dir, qa_rows_file, tmp_path, packing):
    """preview and training call the same two functions (sftune.data.chain): the sequences preview
    shows are the rows of the first step's micro-batches, packing and the probe's layout included."""
    from sftune.preview import preview_sequences
    from sftune.training import setup

    cfg = train_config(tiny_model_dir, qa_rows_file, tmp_path, **{"data.packing": packing, "train.batch_size": 4,
                                                                  "train.grad_accum": 2, "train.max_steps": 2})
    run = setup(cfg)
    try:
        rows = [(mb, r) for mb in run.feed(0) for r in range(mb.input_ids.shape[0])]
    finally:
        run.accelerator.end_training()
    tokenizer, data, seqs = preview_sequences(cfg, n=len(rows) + 1, layout=run.feed.plan.mode)
    first = [s for s in seqs if s["step"] == 0]
    assert len(first) == len(rows) and seqs[len(rows)]["step"] == 1
    for seq, (mb, r) in zip(first, rows):
        k = len(seq["input_ids"])
        assert mb.input_ids[r, :k].tolist() == seq["input_ids"]
        assert mb.position_ids[r, :k].tolist() == seq["position_ids"]
        assert (mb.input_ids[r, k:] == tokenizer.pad_token_id).all()


def test_gpt2_pieces_keep_split_characters(gpt2_tokenizer):
    """On the real GPT-2 tokenizer the issue's examples (each split over byte tokens) read whole."""
    from sftune.preview import token_pieces

    for text in ("Où", "Ωμέγα", "日本語", "😀", "｜"):
        ids = gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert "".join(token_pieces(gpt2_tokenizer, ids)) == text


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
    assert re.search(r"\[image 56x56, 6 tokens\]What colour", out) and "<|image_pad|>" not in out
    assert re.search(r"images +│ 4 in 3 examples", out)
    code, out, err = run_cli(["preview", str(recipe), *args[1:]], capsys)
    seq = [json.loads(line) for line in out.splitlines()][0]  # step 0: the 3 short rows packed in one sequence
    assert sorted(seq["rows"]) == [0, 1, 2]
    assert set(seq) >= {"input_ids", "labels", "position_ids", "text", "rows", "source", "images"}
    pad = seq["input_ids"][seq["images"][0]["start"] + 1]
    assert [seq["input_ids"][im["start"] + 1: im["start"] + im["tokens"] - 1].count(pad) for im in seq["images"]] == \
           [im["tokens"] - 2 for im in seq["images"]]
    assert sorted(im["size"][0] * im["size"][1] for im in seq["images"]) == [28 * 56, 28 * 56, 56 * 56, 56 * 56]
