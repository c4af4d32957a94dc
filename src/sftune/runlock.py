"""One run per output directory: a lock file holding the PID, and an earlier run's log kept.

``output_dir/.sftune.lock`` is created exclusively (``O_CREAT | O_EXCL``) and holds the PID and
host of the run that owns the directory. A second run refuses and names that process. A lock
left by a process that no longer exists (on this host) is taken over, with a note.

A fresh run (not ``train.resume``) into a directory that holds an earlier run's ``metrics.jsonl``
(or its checkpoints) moves them aside to ``previous-N/`` and says so in one line; nothing is deleted.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from sftune.console import is_main_process
from sftune.errors import ConfigError, SftuneError

LOCK_NAME = ".sftune.lock"


class RunLocked(SftuneError):
    """Another run is using the output directory."""


def check_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or refuse with one clear line: it is a file, or it cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir {out_dir} exists and is a file, not a directory; "
                          "choose another train.output_dir")
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"train.output_dir {out_dir} cannot be created: {parent} is a file")
            break
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir {out_dir} cannot be created: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir {out_dir} is not writable (permission denied); "
                          "choose another train.output_dir or fix its permissions")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(path: Path, owner: dict | None) -> RunLocked:
    who = (f"process {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')})"
           if owner else "another process")
    return RunLocked(f"{path.parent} is in use by {who}: one run per output directory.\n"
                     f"  → wait for it to finish, or choose another train.output_dir (if that process is gone, "
                     f"delete {path})")


def refuse_if_locked(out_dir: str | Path) -> None:
    """A quick look before the training stack loads: refuse at once when a live run holds ``out_dir``
    (the lock itself is taken by :class:`RunLock` in ``train``). Only the main process looks."""
    if not is_main_process():
        return
    path = Path(out_dir) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if owner.get("host") != socket.gethostname() or pid_alive(int(owner.get("pid", -1))):
        raise _locked(path, owner)


class RunLock:
    """``with RunLock(out_dir):`` holds the directory for this process (main process only)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.path = Path(out_dir) / LOCK_NAME
        self.enabled, self.held = enabled, False

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written this instant, or unreadable: look again
                    time.sleep(0.2)
                    owner = self._owner()
                if owner and owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
                    from sftune.console import console

                    console.print(f"[yellow]taking over the stale lock {self.path} of process {owner['pid']}, "
                                  "which is no longer running[/]")
                    self.path.unlink(missing_ok=True)
                    continue
                raise _locked(self.path, owner) from None
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise ConfigError(f"train.output_dir {self.path.parent} is not writable: {e.strerror}") from None
                raise
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return self
        raise RunLocked(f"could not take the lock {self.path}; delete it if no run is using {self.path.parent}")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner is None or owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


EARLIER_RUN = ("metrics.jsonl", "final_metrics.json", "checkpoints")


def set_aside_earlier_run(out_dir: Path) -> Path | None:
    """Move an earlier run's log, final metrics and checkpoints into ``previous-N/`` (never delete
    them), so a fresh run neither appends to its log nor mixes with, or prunes, its checkpoints."""
    found = [name for name in EARLIER_RUN if (out_dir / name).exists()]
    if not found:
        return None
    n = 1
    while (out_dir / f"previous-{n}").exists():
        n += 1
    target = out_dir / f"previous-{n}"
    target.mkdir()
    for name in found:
        (out_dir / name).rename(target / name)
    from sftune.console import console

    console.print(f"this is a fresh run: the earlier run's {', '.join(found)} in {out_dir} were moved to "
                  f"{target.name}/ (train.resume=true continues a run instead)", soft_wrap=True)
    return target
