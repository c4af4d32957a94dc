"""Unit tests of sftune.dashboard.runs: a run's state from its files and lock, its total steps (the
compare charts' "fraction of the run"), config differences, and names that stay under RUNS_DIR."""

import os

import pytest

from sftune.dashboard import runs as R

from dashboard_helpers import fake_run


def test_state_from_files_and_lock(tmp_path):
    assert R.state(fake_run(tmp_path, "done")) == "finished"
    assert R.state(fake_run(tmp_path, "live", final=False)) == "running"  # files still changing
    assert R.state(fake_run(tmp_path, "stopped", final=False, checkpoint=True, age_s=3600)) == "interrupted"
    assert R.state(fake_run(tmp_path, "crashed", final=False, age_s=3600)) == "failed"
    assert R.state(fake_run(tmp_path, "locked", final=False, age_s=3600, lock_pid=os.getpid())) == "running"
    assert sorted(R.find_runs(tmp_path)) == ["crashed", "done", "live", "locked", "stopped"]


def test_total_steps_from_max_steps_epochs_or_the_log():
    recs = [{"step": s, "loss": 1.0, "epoch": s / 50} for s in (10, 20)]
    assert R.total_steps(recs, {"train": {"max_steps": 300}}) == 300
    assert R.total_steps(recs, {"train": {"max_steps": None, "epochs": 3}}) == 150  # 50 steps per epoch
    assert R.total_steps(recs, {}) == 20 and R.total_steps([], {}) == 1


def test_config_diff_and_flatten():
    assert R.flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}
    diff = R.config_diff({"x": {"train": {"lr": 1, "seed": 0}}, "y": {"train": {"lr": 2, "seed": 0}}})
    assert diff == [{"key": "train.lr", "values": {"x": 1, "y": 2}}]


@pytest.mark.parametrize("name", ["..", "../x", "/etc", "a/../../b"])
def test_names_never_leave_the_runs_directory(tmp_path, name):
    with pytest.raises(R.NotARun):
        R.inside(tmp_path, name)
