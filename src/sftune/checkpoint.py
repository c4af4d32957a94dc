"""Checkpoints: save and resume training state atomically, keep the newest K.

A checkpoint directory ``output_dir/checkpoints/step-0000120`` holds what accelerate's state
handling saves (model or adapter weights, optimizer, scheduler, RNG states of every rank) plus
``trainer_state.json`` (step, data position, world size). It is written under a temporary name and
renamed into place, so a crash mid-save never leaves a half checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from sftune.errors import SftuneError

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Save the full training state at ``step`` (call on every rank)."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, output_dir: str | Path) -> dict | None:
    """Restore the newest checkpoint into the prepared objects; return its trainer state."""
    ckpts = list_checkpoints(output_dir)
    if not ckpts:
        return None
    path = ckpts[-1]
    state = json.loads((path / "trainer_state.json").read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != accelerator.num_processes:
        raise SftuneError(
            f"the checkpoint {path} was made with {saved_world} process(es) but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    accelerator.load_state(str(path))
    state["path"] = str(path)
    return state
