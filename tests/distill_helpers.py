"""Helpers the distillation tests share: a run's step records and final weights, a saved top-k
directory written through the CLI, and a run resumed from its step-2 checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import train_config


def records(out) -> dict:
    """``{step: record}`` of a run's metrics records that carry a loss."""
    return {m["step"]: m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def weights(out) -> dict:
    """A run's final ``model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def prepare_saved(tmp_path_factory, name: str, model_dir, data_file, over: dict) -> tuple[Path, list[str]]:
    """``sftune distill-prepare`` on a recipe file of this config (``over`` names the teacher): the
    teacher's top 400 (= the test vocabulary), 5 examples per shard. Returns the directory and the
    CLI arguments (to run it again)."""
    from sftune.cli import main
    from sftune.config import config_to_yaml

    out = tmp_path_factory.mktemp(name)
    cfg = train_config(model_dir, data_file, out / "unused", **over, **{
        "distill.prepare_top_k": 400, "distill.prepare_shard_size": 5})
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(config_to_yaml(cfg))
    args = ["distill-prepare", str(recipe), "--out", str(out), f"distill.teacher={over['distill.teacher']}"]
    assert main(args) == 0
    return out, args


def resumed_at_step_2(config, tmp_path: Path) -> tuple[dict, dict]:
    """Train ``config(out, **more)`` (a function of the output directory) to the end in ``full``, then
    again in ``cut`` from the step-2 checkpoint; assert the final weights are bit-identical. Returns
    both runs' step records (``full``, ``cut``)."""
    import torch

    from sftune.training import train

    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config(full))
    cut_at_step_2(full, cut)
    train(config(cut, **{"train.resume": True}))
    wf, wc = weights(full), weights(cut)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    return records(full), records(cut)


def cut_at_step_2(full: Path, cut: Path) -> None:
    """``cut``: the run ``full`` as if stopped after its step-2 checkpoint (that checkpoint and the
    metrics records up to step 2), ready for ``train.resume=true``."""
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", cut / "checkpoints" / "step-0000002")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l).get("step", 99) <= 2) + "\n")
