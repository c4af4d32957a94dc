"""Writing run files safely: JSON that stays JSON, and a full disk that says which directory.

A leaf module (it imports nothing of sftune but the errors), so the console, the checkpoints,
evaluation and the training loop can all write files without importing one another:

* :func:`json_safe` / :func:`dumps` write NaN and infinity as ``null``: every JSON file a run
  writes is valid JSON.
* :func:`disk_errors` turns "no space left on device" (which torch reports as ``unexpected pos``)
  into one clear line naming the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
from pathlib import Path

from sftune.errors import SftuneError


# ----------------------------------------------------------------------------- non-finite values


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``None`` (JSON ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """``json.dumps`` that never writes the invalid literals ``NaN`` / ``Infinity``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


# ----------------------------------------------------------------------------- a full disk


class DiskFull(SftuneError):
    """A write failed because the disk (or quota) is full."""


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "unexpected pos" in text or "disk quota" in text


@contextlib.contextmanager
def disk_errors(directory: str | Path, what: str, *, kept: str | None = None, cleanup: Path | None = None):
    """Inside the block, a full disk becomes :class:`DiskFull` naming ``directory``; ``cleanup``
    (a temporary directory) is removed first."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        if cleanup is not None:
            import shutil

            shutil.rmtree(cleanup, ignore_errors=True)
        extra = f" {kept}" if kept else ""
        raise DiskFull(f"no space left on device while writing {what} to {directory}.{extra}\n"
                       f"  → free some space (or point train.output_dir at a larger disk) and run again"
                       + (" with train.resume=true" if kept else "")) from None
