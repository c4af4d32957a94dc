"""Unit tests of sftune.safeio: JSON without NaN, a full disk as one line naming the directory."""

import errno
import json

import pytest

from sftune.safeio import DiskFull, disk_errors, dumps, is_disk_full


def strict_json(text: str):
    """Parse as a strict JSON reader would: NaN / Infinity literals are errors."""
    def refuse(name):
        raise ValueError(f"invalid JSON literal {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_never_holds_nan():
    text = dumps({"loss": float("nan"), "ppl": float("inf"), "xs": [1.0, float("-inf")]})
    assert strict_json(text) == {"loss": None, "ppl": None, "xs": [1.0, None]}


def test_disk_full_is_one_line_naming_the_directory(tmp_path):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("[enforce fail at inline_container.cc] unexpected pos 1234 vs 99"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    partial = tmp_path / "tmp-ckpt"
    partial.mkdir()
    with pytest.raises(DiskFull) as e, disk_errors(tmp_path, "a checkpoint", kept="The last one is kept.",
                                                   cleanup=partial):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert f"while writing a checkpoint to {tmp_path}" in str(e.value) and "train.resume=true" in str(e.value)
    assert not partial.exists()  # the half-written directory is removed
    with pytest.raises(PermissionError), disk_errors(tmp_path, "x"):  # other errors pass through unchanged
        raise PermissionError("denied")
