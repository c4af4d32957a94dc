"""Console output and metric sinks: the rich console, the progress bar (one plain line per logged
record when stderr is not a terminal), ``metrics.jsonl`` and its TensorBoard / W&B mirrors.

Progress and logs go to stderr; command results (``--json`` output, generations) go to stdout, so
both can be piped. Only the main process prints and writes metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from rich.console import Console

from sftune.safeio import disk_errors, dumps
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


class PlainProgress:
    """The progress bar's stand-in when stderr is not a terminal (a log file, CI, ``nohup``): one
    plain line per logged record (every ``train.log_every`` steps, as Hugging Face's Trainer prints
    its logs), with the step, loss, learning rate, tokens/s and ETA::

        step 150/2000 (7%)  loss 1.2345  lr 1.00e-03  12,345 tok/s  elapsed 0:00:15  ETA 0:03:05

    An update that carries metrics (``loss=``, ``lr=``, ``tps=``) is a record: it is printed with the
    step count that follows it. When records are further apart than ``every_s`` seconds (env
    ``SFTUNE_PROGRESS_SECONDS``, default 30), a heartbeat line with the step alone shows the run
    moving in between; the last step always gets a line. No ``\\r`` redraws.
    """

    METRICS = frozenset({"loss", "lr", "tps"})
    """The fields that make an update a record (others, such as the checkpoint's age, ride along)."""

    def __init__(self, enabled: bool, every_s: float | None = None):
        self.enabled = enabled
        if every_s is None:
            try:
                every_s = float(os.environ.get("SFTUNE_PROGRESS_SECONDS", "30"))
            except ValueError:
                every_s = 30.0
        self.every_s = every_s
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        now = time.monotonic()
        self.tasks[0] = {"total": total, "completed": completed, "start": completed, "t0": now, "last": now,
                         "printed": completed, "record": False, **fields}
        return 0

    def update(self, task: int, completed: int | None = None, **fields) -> None:
        t = self.tasks[task]
        t.update(fields)
        if fields.keys() & self.METRICS:  # a new record: printed with the step count that follows it
            t["record"] = True
        if completed is None:
            return
        t["completed"] = completed
        now = time.monotonic()
        record, done = t["record"], completed >= t["total"]
        if self.enabled and completed > t["printed"] and (record or done or now - t["last"] >= self.every_s):
            t["last"], t["printed"], t["record"] = now, completed, False
            console.print(self.line(t, now, record or done), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def line(t: dict, now: float, metrics: bool = True) -> str:
        """A record's line (``metrics``: the latest loss, lr and tokens/s), or a heartbeat's (the step alone)."""
        def hms(seconds: float) -> str:
            seconds = int(round(seconds))
            return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

        elapsed = now - t["t0"]
        steps = t["completed"] - t["start"]
        left = t["total"] - t["completed"]
        eta = hms(elapsed / steps * left) if steps > 0 else "-"
        pct = 100 * t["completed"] / max(t["total"], 1)
        stats = f"loss {t.get('loss', '-')}  lr {t.get('lr', '-')}  {t.get('tps', '-')} tok/s  " if metrics else ""
        ckpt = f"{t['ckpt'].strip()}  " if t.get("ckpt") else ""  # the last checkpoint's age (sftune.cluster)
        return f"step {t['completed']}/{t['total']} ({pct:.0f}%)  {stats}{ckpt}elapsed {hms(elapsed)}  ETA {eta}"


def training_progress(enabled: bool) -> Progress | PlainProgress:
    """A live progress bar on a terminal; otherwise a plain line per record (see :class:`PlainProgress`)."""
    if not console.is_terminal:
        return PlainProgress(enabled)
    return Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=24),
        TextColumn("loss [cyan]{task.fields[loss]}[/] lr {task.fields[lr]} {task.fields[tps]} tok/s{task.fields[ckpt]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


class _DropMessages(logging.Filter):
    def __init__(self, *parts: str):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not any(part in msg for part in self.parts)


_quieted = False


def quiet_third_party() -> None:
    """Silence library noise that says nothing to an sftune user, so a log reads cleanly:

    * datasets' and transformers' ``\\r`` progress bars when stderr is not a terminal;
    * accelerate's ``Removed shared tensor {...} while saving`` at every checkpoint (tied
      embeddings, saved once and tied again on load: expected);
    * transformers' ``is_gradient_checkpointing is deprecated`` FutureWarning (raised inside peft);
    * "Token indices sequence length is longer than ..." (sftune truncates and reports it itself).
    """
    global _quieted
    if _quieted:
        return
    _quieted = True
    if not sys.stderr.isatty() and "ipykernel" not in sys.modules:  # notebooks draw widgets, not \r lines
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        try:
            import datasets

            datasets.disable_progress_bars()
        except Exception:  # pragma: no cover - datasets is a dependency, but keep this harmless
            pass
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover
            pass
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    logging.getLogger("accelerate.utils.other").addFilter(_DropMessages("Removed shared tensor"))
    logging.getLogger("transformers.tokenization_utils_base").addFilter(
        _DropMessages("Token indices sequence length is longer"))


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors to optional backends.

    ``sinks``: more receivers of every record (objects with ``log(record)`` and ``close()``), such as
    the Trainer-style history and callbacks of :mod:`sftune.compat.trainer`; they also get the
    events of :meth:`notify` (a checkpoint saved), which are not written to ``metrics.jsonl``."""

    def __init__(self, output_dir: str | Path, report_to: list[str], enabled: bool, config: dict | None = None,
                 sinks=()):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.backends = []
        self.sinks = list(sinks) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in report_to:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    console.print(r"[yellow]report_to tensorboard needs: pip install 'sftune\[tensorboard]'[/]")
                    continue
                self.backends.append(("tensorboard", SummaryWriter(str(Path(output_dir) / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    console.print(r"[yellow]report_to wandb needs: pip install 'sftune\[wandb]'[/]")
                    continue
                self.backends.append(("wandb", wandb.init(project="sftune", config=config or {})))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with disk_errors(self.path.parent, "metrics.jsonl"), self.path.open("a") as f:
            f.write(dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for kind, backend in self.backends:
            if kind == "tensorboard":
                for k, v in scalars.items():
                    backend.add_scalar(k, v, step)
            else:
                backend.log(scalars, step=step)
        self.notify(record)

    def notify(self, record: dict) -> None:
        """Hand ``record`` to the sinks only."""
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        for kind, backend in self.backends:
            backend.close() if kind == "tensorboard" else backend.finish()


def truncate_metrics(output_dir: str | Path, step: int) -> int:
    """Drop the records after ``step`` from ``metrics.jsonl`` (a resume from an earlier checkpoint
    abandons them: the log then reads as one run and the loss plot does not draw back). Returns
    the number of records dropped."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            rec_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue
        if not isinstance(rec_step, (int, float)) or rec_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (which set ``RANK``), or a plain process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
