"""The vision quickstart: generated pictures (deterministic, held out, every colour and shape), the
shipped assets equal what write_assets makes, and a shortened run learns (slow)."""

from __future__ import annotations

import io
import json
import random

import pytest

from sftune.cli import main
from sftune.quickstart_vision import COLOURS, SHAPES, make_dataset, make_rows, write_assets


def test_generated_pictures_are_deterministic_balanced_and_held_out():
    from PIL import Image

    a, b = make_rows(96, random.Random(1)), make_rows(96, random.Random(1))
    assert [r["images"] for r in a] == [r["images"] for r in b]
    assert {r["colour"] for r in a} == set(COLOURS) and {r["shape"] for r in a} == set(SHAPES)
    for r in a[:6]:
        im = Image.open(io.BytesIO(r["images"][0])).convert("RGB")
        assert im.size == (32, 32) and COLOURS[r["colour"]] in {c for _, c in im.getcolors(4096)}
        assert r["messages"][0]["content"][0] == {"type": "image"}
        assert r["messages"][1]["content"][0]["text"] == (r["colour"] if r["task"] == "colour" else r["shape"])
    ds = make_dataset(200, 40)
    assert not set(ds["test"]["images"][i][0] for i in range(40)) & set(ds["train"]["images"][i][0] for i in range(200))


def test_shipped_assets_are_what_write_assets_makes(tmp_path):
    from pathlib import Path

    import sftune

    shipped = Path(sftune.__file__).parent / "assets" / "quickstart-vision"
    write_assets(tmp_path)
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                 "tokenizer.json"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), name


@pytest.mark.slow
def test_shortened_vision_quickstart_learns(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "quickstart-vision", "train.max_steps=200", "data.limit=1600", "eval.limit=40",
                 "eval.samples=0", f"train.output_dir={out}"]) == 0
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["exact_match_before"] <= 0.05
    assert metrics["exact_match_after"] >= 0.5  # 75% measured (the colours first); 1,000 steps: 80%
    assert (out / "processor_config.json").is_file()  # the run loads as an image-text-to-text model
