"""Console output and metric sinks: the rich console, the progress bar, ``metrics.jsonl``.

Progress and logs go to stderr; command results (``--json`` output, generations) go to stdout, so
both can be piped. Only the main process prints and writes metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from sftune.faults import disk_errors, dumps
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def training_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(bar_width=24),
        TextColumn("loss [cyan]{task.fields[loss]}[/] lr {task.fields[lr]} {task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors to optional backends."""

    def __init__(self, output_dir: str | Path, report_to: list[str], enabled: bool, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.backends = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for name in report_to:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    console.print("[yellow]report_to tensorboard needs: pip install 'sftune[tensorboard]'[/]")
                    continue
                self.backends.append(("tensorboard", SummaryWriter(str(Path(output_dir) / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    console.print("[yellow]report_to wandb needs: pip install 'sftune[wandb]'[/]")
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

    def close(self) -> None:
        for kind, backend in self.backends:
            backend.close() if kind == "tensorboard" else backend.finish()


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (which set ``RANK``), or a plain process."""
    import os

    return int(os.environ.get("RANK", "0")) == 0
