"""Unit tests of sftune.runlock: one run per output directory (the lock, a stale lock taken over),
an unusable output directory refused in one line, an earlier run's files set aside."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sftune.errors import ConfigError
from sftune.runlock import LOCK_NAME, RunLock, RunLocked, check_output_dir, pid_alive, refuse_if_locked, \
    set_aside_earlier_run


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive():
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid())


def test_lock_is_held_refused_and_released(tmp_path):
    with RunLock(tmp_path) as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert lock.held and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match="one run per output directory"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunLocked, match=f"process {os.getpid()}"):
            refuse_if_locked(tmp_path)
        RunLock(tmp_path, enabled=False).acquire()  # other ranks do not lock
    assert not (tmp_path / LOCK_NAME).exists()
    refuse_if_locked(tmp_path)


def test_stale_lock_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "x"}))
    refuse_if_locked(tmp_path)  # a dead owner does not block
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over the stale lock" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="exists and is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="cannot be created"):
        check_output_dir(tmp_path / "f" / "run")
    check_output_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_earlier_run_is_moved_aside_never_deleted(tmp_path, capsys):
    assert set_aside_earlier_run(tmp_path) is None
    for n in (1, 2):
        (tmp_path / "metrics.jsonl").write_text(f"run {n}\n")
        (tmp_path / "checkpoints").mkdir()
        assert set_aside_earlier_run(tmp_path) == tmp_path / f"previous-{n}"
    assert (tmp_path / "previous-1" / "metrics.jsonl").read_text() == "run 1\n"
    assert (tmp_path / "previous-2" / "checkpoints").is_dir() and not (tmp_path / "metrics.jsonl").exists()
    assert "moved to previous-2/" in capsys.readouterr().err
