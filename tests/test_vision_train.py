"""Vision-language training end to end on the tiny models: each style trains, packed and not, and the
accumulation invariance holds with image rows (1 micro-batch of 4 == 2 of 2: losses, grad norms, weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_models as vm
from sftune.training import train

from conftest import train_config


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    return vm.write_data(tmp_path_factory.mktemp("vdata"), n=8)


def _cfg(model_dir, data, out, **over):
    base = {"data.template": None, "data.max_length": 256, "train.max_steps": 2, "train.batch_size": 4}
    base.update(over)
    return train_config(model_dir, data, out, **base)


@pytest.mark.parametrize("style", ["qwen2_vl", pytest.param("llava", marks=pytest.mark.slow),
                                   pytest.param("idefics3", marks=pytest.mark.slow)])
def test_each_style_trains_packed(vlm, image_data, tmp_path, style, no_plots):
    out = tmp_path / style
    train(_cfg(vlm(style), image_data, out, **{"data.packing": True, "data.eval_split": 0.25,
                                               "train.eval_every": 2}))
    logged = [m for m in metrics(out) if "loss" in m]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in logged)
    assert any(torch.isfinite(torch.tensor(m["eval_loss"])) for m in metrics(out) if "eval_loss" in m)
    report = json.loads((out / "data_report.json").read_text())
    assert 5 <= report["images"]["images"] <= 9  # 10 images in 8 rows, a quarter held out and report["model_check"]["status"] == "exact"
    assert report["model_check"]["layout"] == "flat"


@pytest.mark.slow
@pytest.mark.parametrize("style", ["qwen2_vl", "idefics3"])
def test_grad_accumulation_invariance_with_images(vlm, image_data, tmp_path, style, no_plots):
    from transformers import AutoModelForImageTextToText

    runs = {}
    for bs, ga in [(4, 1), (2, 2)]:
        out = tmp_path / f"{bs}x{ga}"
        train(_cfg(vlm(style), image_data, out, **{"train.batch_size": bs, "train.grad_accum": ga,
                                                   "data.packing": True}))
        model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32)
        runs[(bs, ga)] = ({m["step"]: m for m in metrics(out) if "loss" in m}, model.state_dict())
    (ref, ref_w), (got, w) = runs[(4, 1)], runs[(2, 2)]
    for step in (1, 2):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)
    for k in ref_w:
        torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.slow
def test_resume_with_images_is_exact(vlm, image_data, tmp_path, no_plots):
    """Ctrl-C at step 2 saves a checkpoint; resume=true reproduces the uninterrupted 4-step run."""
    from transformers import AutoModelForImageTextToText

    from sftune.training import loop, setup

    over = {"train.batch_size": 2, "train.max_steps": 4, "data.packing": True}
    train(_cfg(vlm("qwen2_vl"), image_data, tmp_path / "straight", **over))
    cut = tmp_path / "cut"
    run = setup(_cfg(vlm("qwen2_vl"), image_data, cut, **over))
    feed = run.feed

    class InterruptAt2:  # the run's data plan, with a Ctrl-C as step 2's batches are asked for
        def __getattr__(self, name):
            return getattr(feed, name)

        def __call__(self, step):
            if step == 2:
                raise KeyboardInterrupt
            return feed(step)

    run.feed = InterruptAt2()
    assert loop(run).interrupted
    run.accelerator.end_training()
    train(_cfg(vlm("qwen2_vl"), image_data, cut, **{**over, "train.resume": True}))
    a = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    b = {m["step"]: m["loss"] for m in metrics(cut) if "loss" in m}
    assert sorted(b) == [1, 2, 3, 4] and all(b[k] == pytest.approx(a[k], rel=1e-6) for k in a)
    wa = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "straight")).state_dict()
    wb = AutoModelForImageTextToText.from_pretrained(str(cut)).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-6, msg=k)


def _interrupted_at(feed, at: int):
    class Interrupt:  # the run's data plan, with a Ctrl-C as step ``at``'s batches are asked for
        def __getattr__(self, name):
            return getattr(feed, name)

        def __call__(self, step):
            if step == at:
                raise KeyboardInterrupt
            return feed(step)

    return Interrupt()


STREAMED = {"data.streaming": True, "train.max_steps": 3, "train.batch_size": 2, "data.packing": True,
            "data.pack_buffer": 4, "data.shuffle_buffer": 4}


def test_streamed_images_train(vlm, image_data, tmp_path, no_plots):
    """data.streaming=true with image rows trains 3 steps; the report counts the images trained."""
    train(_cfg(vlm("qwen2_vl"), image_data, tmp_path, **STREAMED))
    losses = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["images"]["images"] == report["sources"][0]["images_trained"] > 0


def test_streamed_images_resume_exactly(vlm, image_data, tmp_path, no_plots):
    """A streamed image run cut by Ctrl-C at step 2 and resumed gives the uninterrupted run's losses
    and weights (the images ride in the stream's saved position)."""
    from transformers import AutoModelForImageTextToText

    from sftune.training import loop, setup

    train(_cfg(vlm("qwen2_vl"), image_data, tmp_path / "straight", **STREAMED))
    cut = tmp_path / "cut"
    run = setup(_cfg(vlm("qwen2_vl"), image_data, cut, **STREAMED))
    run.feed = _interrupted_at(run.feed, 2)
    assert loop(run).interrupted
    run.accelerator.end_training()
    train(_cfg(vlm("qwen2_vl"), image_data, cut, **{**STREAMED, "train.resume": True}))
    a = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    b = {m["step"]: m["loss"] for m in metrics(cut) if "loss" in m}
    assert sorted(b) == sorted(a) == [1, 2, 3] and all(b[k] == pytest.approx(a[k], rel=1e-6) for k in a)
    wa = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "straight")).state_dict()
    wb = AutoModelForImageTextToText.from_pretrained(str(cut)).state_dict()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-6, msg=k)
