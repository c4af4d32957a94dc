"""Checkpoints: save and resume training state atomically, keep the newest K.

A checkpoint directory ``output_dir/checkpoints/step-0000120`` holds what accelerate's state
handling saves (model or adapter weights, optimizer, scheduler, RNG states of every rank) plus
``trainer_state.json`` (step, data position, world size). It is written under a temporary name and
renamed into place, so a crash mid-save never leaves a half checkpoint that resume would pick.

Its ``manifest.json``, written last, records the size and SHA-256 of every file in it (sharded
FSDP files included: :mod:`sftune.digests`). Hashing a gigabyte takes about as long as writing it,
so rank 0 does it in a background thread while training goes on: the thread hashes, writes the
manifest, renames the directory into place and prunes to ``keep``; the next save, a load and the
end of the run (:func:`saves_finished`) wait for it. Until then the checkpoint is not listed. Resume checks the newest checkpoint first: one whose
files differ from the manifest is set aside as ``step-N.corrupt`` (kept, no longer listed, so keep-K
rotation never counts it) and the previous one is checked, with one line naming the file and the
checkpoint taken. A checkpoint without a manifest (written before sftune recorded digests) is taken
with a note, its files checked by loading them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
from pathlib import Path

import torch
from rich.markup import escape
from safetensors.torch import load_file

from sftune.errors import SftuneError
from sftune.digests import check_dir, record, set_aside
from sftune.safeio import disk_errors, dumps
from sftune.console import console

_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path, wait: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first (``wait``: once the ones being saved in the background are in place)."""
    if wait:
        wait_for_saves(raise_errors=False)
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


_pending: list[threading.Thread] = []  # rank 0's checkpoints being hashed and put in place
_failed: list[BaseException] = []


def wait_for_saves(raise_errors: bool = True) -> None:
    """Block until every checkpoint saved in the background is in place; raise what went wrong
    there (a full disk while writing the manifest)."""
    while _pending:
        _pending.pop(0).join()
    if _failed and raise_errors:
        failed = _failed[0]
        _failed.clear()
        raise failed


@contextlib.contextmanager
def saves_finished():
    """The block's checkpoints are all in place when it ends (with an error too: then its error wins)."""
    try:
        yield
    except BaseException:
        wait_for_saves(raise_errors=False)
        _failed.clear()
        raise
    wait_for_saves()


def _put_in_place(tmp: Path, final: Path, output_dir, keep: int) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict, keep: int,
                    files: dict[str, bytes] | None = None, digests: bool = True, background: bool = True) -> Path:
    """Save the full training state at ``step`` (call on every rank). ``files``: more files for the
    checkpoint directory, by name (the data position of a streamed run). The digests are taken in a
    background thread unless ``background=False``; ``digests=False`` writes no manifest (only
    ``bench/checkpoint.py`` uses these two, to measure what the digests cost)."""
    wait_for_saves()
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    previous = list_checkpoints(output_dir)
    kept = (f"The last good checkpoint, {previous[-1]}, is kept." if previous else "") + \
        f" The partial checkpoint {tmp.name} was removed."
    with disk_errors(root, f"the checkpoint of step {step}", kept=kept.strip(), cleanup=tmp):
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, content in (files or {}).items():
                (tmp / name).write_bytes(content)
            (tmp / "trainer_state.json").write_text(dumps({**state, "step": step}, indent=2))

            def finish() -> None:  # every file of every rank hashed, then the manifest: last, atomically
                try:
                    with disk_errors(root, f"the checkpoint of step {step}", kept=kept.strip(), cleanup=tmp):
                        if digests:
                            record(tmp, step=step)
                        _put_in_place(tmp, final, output_dir, keep)
                except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait_for_saves
                    _failed.append(e)

            if digests and background:
                _pending.append(threading.Thread(target=finish, name=f"sftune-checkpoint-{step}"))
                _pending[-1].start()  # not a daemon: even an error exit waits for it
            else:
                finish()
                wait_for_saves()
    accelerator.wait_for_everyone()
    return final


class CheckpointDamaged(SftuneError):
    """No checkpoint in the output directory could be loaded."""


def damaged_file(path: Path) -> tuple[Path, str] | None:
    """The first file of checkpoint ``path`` that does not load, and why (``None``: all load)."""
    def first_line(e: Exception) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]

    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                torch.load(str(f), map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure to load means damaged
            return f, f"{type(e).__name__}: {first_line(e)}"
    return None


def _load_one(accelerator, path: Path) -> dict:
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointDamaged(f"{state_file} does not load: {e}") from None
    saved_world = state.get("world_size", 1)
    if saved_world != accelerator.num_processes:
        raise SftuneError(
            f"the checkpoint {path} was made with {saved_world} process(es) but this run has "
            f"{accelerator.num_processes}; resume with the same number of processes"
        )
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # noqa: BLE001 - name the file that failed, whatever the loader raised
        found = damaged_file(path)
        if found is None:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SftuneError(f"the checkpoint {path} does not fit this run ({type(e).__name__}: {first})\n"
                              "  → resume with the model, LoRA and optimizer settings it was saved with") from None
        f, why = found
        raise CheckpointDamaged(f"{f} does not load ({why})") from None
    return state


def _set_aside_damaged(output_dir: str | Path) -> tuple[list[str], bool]:
    """Check checkpoints newest first until one is intact (or legacy); set the damaged ones aside.
    Returns what was set aside (``"step-N (file: why)"``) and whether a legacy checkpoint came next."""
    aside = []
    for path in reversed(list_checkpoints(output_dir)):
        check = check_dir(path)
        if check.ok:
            return aside, check.status == "legacy"
        moved = set_aside(path)
        aside.append(f"{path.name} ({check.file}: {check.why}; set aside as {moved.name})")
    return aside, False


def load_checkpoint(accelerator, output_dir: str | Path) -> dict | None:
    """Restore the newest intact checkpoint into the prepared objects; return its trainer state.

    Rank 0 checks the digests first and sets damaged checkpoints aside (one line says which file
    failed and which checkpoint is taken). A checkpoint without digests whose file does not load
    is named, with a warning, and the previous one is tried; when none is left the error names
    every damaged file."""
    wait_for_saves()
    aside, legacy = _set_aside_damaged(output_dir) if accelerator.is_main_process else ([], False)
    accelerator.wait_for_everyone()
    ckpts = list_checkpoints(output_dir)
    if not ckpts and aside:
        raise CheckpointDamaged("no intact checkpoint in " + str(checkpoint_dir(output_dir)) + ": "
                                + "; ".join(aside) + "\n  → start a fresh run (train.resume=false) or restore a "
                                "checkpoint from a backup")
    if not ckpts:
        return None
    if aside and accelerator.is_main_process:
        console.print(f"[yellow]warning: damaged checkpoint {escape('; '.join(aside))}: resuming from "
                      f"{ckpts[-1].name}[/]", soft_wrap=True)
    if legacy and accelerator.is_main_process:
        console.print(f"note: {ckpts[-1].name} has no digests (written before sftune recorded them): "
                      "its files are checked by loading them", soft_wrap=True)
    failures = []
    for path in reversed(ckpts):
        try:
            state = _load_one(accelerator, path)
        except CheckpointDamaged as e:
            failures.append(str(e))
            if accelerator.is_main_process:
                console.print(f"[yellow]warning: the checkpoint {path.name} is damaged: {e}; "
                              "trying the previous checkpoint[/]", soft_wrap=True)
            continue
        if failures and accelerator.is_main_process:
            console.print(f"[yellow]warning: resuming from the older checkpoint {path.name}[/]")
        state["path"] = str(path)
        return state
    raise CheckpointDamaged("no checkpoint in " + str(checkpoint_dir(output_dir)) + " loads:\n  "
                            + "\n  ".join(failures)
                            + "\n  → start a fresh run (train.resume=false) or restore a checkpoint from a backup")
