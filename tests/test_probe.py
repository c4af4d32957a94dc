"""Unit tests of sftune.probe: the start-up check picks the longest examples, keeps the flat layout
when it is exact for the model, and records its line in the data report. (Every model family
through the probe: test_model_families.py.)"""

from types import SimpleNamespace

import numpy as np
import pytest

from sftune.config import Config
from sftune.errors import ConfigError
from sftune.data.report import DataReport
from sftune.probe import choose_layout, probe_examples


class Examples:
    def __init__(self, lengths):
        self.lengths = np.array(lengths)

    def example(self, i):
        ids = [3 + (i * 7 + j) % 50 for j in range(int(self.lengths[i]))]
        return ids, [-100] * 2 + ids[2:]


def test_probe_examples_are_the_longest_in_order():
    got = probe_examples(Examples([5, 40, 12, 33, 40, 8]), k=3)
    assert [len(ids) for ids, _ in got] == [40, 33, 40]  # rows 1, 3, 4: the longest, in row order
    assert probe_examples(Examples([5, 40, 12]), k=3, scan=2)[1][0] == Examples([5, 40]).example(1)[0]


@pytest.mark.parametrize("check", ["auto", "off"])
def test_exact_flat_layout_is_kept_and_reported(tiny_model_dir, check):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    report = DataReport(source="t", format="t", split="train", max_length=64)
    cfg = Config.model_validate({"model": {"path": str(tiny_model_dir), "check": check}})
    choice = choose_layout(cfg, model, SimpleNamespace(train=Examples([12, 30, 9, 22])), report)
    assert choice.layout == "flat"
    if check == "auto":
        assert choice.record["status"] == "exact" and report.model_check["layout"] == "flat"
        assert "model check" in choice.line and report.model_check["ms"] > 0


def test_unknown_check_value_is_refused():
    with pytest.raises(Exception, match="model.check"):
        Config.model_validate({"model": {"check": "sometimes"}})


class ImageExamples:
    """Examples with images (the "images" extras) for the probe."""

    has_extras = True

    def __init__(self, examples):
        self.items = examples
        self.lengths = np.array([len(e[0]) for e in examples])

    def example(self, i):
        return np.asarray(self.items[i][0]), np.asarray(self.items[i][1])

    def extras(self, i):
        return self.items[i][3]


def test_probe_runs_images_and_catches_images_out_of_example_order(vlm, monkeypatch):
    """With the images in example order the flat layout is exact; a collator that lays them out in
    another order (the last example's first) differs in every batch of several examples: refused."""
    import torch
    from transformers import AutoModelForImageTextToText

    from sftune.data import extras as data_extras
    from sftune.data import vision_batch as vb
    from test_data_vision import _rows
    from sftune.vision_model import load_processor

    path = vlm("qwen2_vl")
    examples, _ = _rows(load_processor(str(path)))
    data = SimpleNamespace(train=ImageExamples(examples))
    assert all("images" in e[3] for e in probe_examples(data.train))
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)
    cfg = Config.model_validate({"model": {"path": str(path)}})
    assert choose_layout(cfg, model, data).record["status"] == "exact"

    def reversed_order(placed, batch):
        vb.collate_images(list(reversed(placed)), batch)

    monkeypatch.setitem(data_extras._COLLATORS, "images", reversed_order)
    with pytest.raises(ConfigError, match="no row layout reproduces"):
        choose_layout(cfg, model, data)
