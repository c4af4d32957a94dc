"""Checkpoints (``sftune.checkpoint``): keep-K pruning, atomic writes, clear errors. Resume equality is in
test_train.py (scheduled checkpoints) and test_faults.py (Ctrl-C, damaged checkpoints, disk full)."""

import pytest

from sftune.checkpoint import list_checkpoints
from sftune.errors import ConfigError
from sftune.training import train

from conftest import train_config as cfg_for


def test_checkpoints_keep_last_k(tiny_model_dir, qa_rows_file, tmp_path):
    out = tmp_path / "ck"
    train(cfg_for(tiny_model_dir, qa_rows_file, out, **{"train.max_steps": 7, "train.save_every": 2,
                                                         "train.keep_checkpoints": 2, "train.batch_size": 4}))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-0000006", "step-0000007"]  # the final step is saved too; no .tmp leftovers
    assert [p.name for p in list_checkpoints(out)] == names


def test_half_written_checkpoint_is_never_listed(tmp_path):
    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-step-0000004").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]


def test_resume_without_checkpoint_is_clear_error(tiny_model_dir, qa_rows_file, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(cfg_for(tiny_model_dir, qa_rows_file, tmp_path / "none", **{"train.resume": True}))


def test_manifest_lists_every_file_and_is_written_last(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch):
    """Each checkpoint's manifest.json covers all its files (weights, optimizer, scheduler, RNG, state); the
    background hashing is done when train() returns, and a disk filling up while the manifest is written
    is the usual one-line error at the next save, with no temporary directory left behind."""
    import errno
    import json

    from sftune.digests import check_dir, files_under
    from sftune.safeio import DiskFull

    out = tmp_path / "ck"
    train(cfg_for(tiny_model_dir, qa_rows_file, out, **{"train.max_steps": 2, "train.save_every": 1,
                                                         "train.batch_size": 4}))
    for ck in list_checkpoints(out):
        files = json.loads((ck / "manifest.json").read_text())["files"]
        assert sorted(files) == files_under(ck) and len(files) == 5 and check_dir(ck).status == "intact"

    import sftune.checkpoint as checkpoint

    def full(root, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "record", full)
    with pytest.raises(DiskFull, match="no space left on device while writing the checkpoint of step 1"):
        train(cfg_for(tiny_model_dir, qa_rows_file, tmp_path / "full", **{"train.max_steps": 3,
                                                                           "train.save_every": 1}))
    assert not list((tmp_path / "full" / "checkpoints").iterdir())  # the partial one removed, nothing listed
