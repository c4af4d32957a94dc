"""Loss spikes: a step whose loss or gradient norm jumps far above its recent history.

The rule (checked before the optimizer update, on the numbers every rank agrees on):

* the step's mean loss ``L`` is a spike when ``L > train.spike_factor x M`` **and**
  ``L > M + train.spike_min_jump``, where ``M`` is the median loss of the last ``train.spike_window``
  steps that were not spikes (the absolute floor keeps a small loss, say 0.05 against 0.01, from
  counting);
* the gradient norm ``G`` (before clipping; only with ``train.max_grad_norm``) is a spike when
  ``G > train.spike_grad_factor x`` the median gradient norm of those steps.

Nothing fires until ``spike_window`` steps are in the window (the warm-up), and a spike never
enters the window. The window travels in every checkpoint (``trainer_state.json``), so a resumed
run needs no new warm-up.

A spike is logged (a console line, a ``spike`` record in ``metrics.jsonl`` drawn on the
dashboard's loss chart, counted in ``final_metrics.json`` and ``report.md``) and then, by
``train.on_spike``:

* ``warn`` (default): the update goes ahead;
* ``skip``: the update is dropped, as ``train.on_nonfinite=skip`` drops a NaN step (the same code
  path in the loop), counted, up to ``train.max_skipped_steps``;
* ``rollback``: the newest intact checkpoint is reloaded (weights, optimizer, schedule, RNG, data
  position, this window) and the steps from it to the spike are replayed, except the spiking
  step, whose batch is skipped (no update). Deterministic: replaying is bit-exact like any resume. Without a
  checkpoint to go back to the update is skipped instead. ``metrics.jsonl`` drops the abandoned
  records, as a resume does.
"""

from __future__ import annotations

import math
import statistics

from sftune.checkpoint import list_checkpoints, load_checkpoint
from sftune.console import console, truncate_metrics
from sftune.faults import TrainingDiverged


class Rollback(Exception):
    """Raised out of the loop's step by ``on_spike=rollback``; the loop restarts from :func:`rollback`."""


class SpikeGuard:
    """Checks each step's loss and gradient norm against the window of recent steps."""

    def __init__(self, train_cfg, logger, accelerator=None):
        t = train_cfg
        self.mode, self.window, self.factor = t.on_spike, t.spike_window, t.spike_factor
        self.grad_factor, self.min_jump, self.max_skips = t.spike_grad_factor, t.spike_min_jump, t.max_skipped_steps
        self.logger, self.accelerator = logger, accelerator
        self.main = accelerator is None or accelerator.is_main_process
        self.history: list[tuple[int, float, float | None]] = []  # (step, loss, grad norm) of recent normal steps
        self.records: list[dict] = []  # every spike seen (what metrics.jsonl holds)
        self.skipped: list[int] = []  # steps whose update a spike dropped (skip, or a rollback's replay)
        self.drop: set[int] = set()  # steps a rollback replays without their batch

    # -- the rule

    def rule(self, loss: float, norm: float | None) -> str | None:
        """Why ``loss`` / ``norm`` is a spike against the window (``None``: it is not)."""
        if self.window == 0 or len(self.history) < self.window:
            return None  # warm-up
        m = statistics.median(h[1] for h in self.history)
        if loss > self.factor * m and loss > m + self.min_jump:
            return f"loss {loss:.4g} > {self.factor:g} x median {m:.4g} of the last {self.window} steps"
        norms = [h[2] for h in self.history if h[2] is not None]
        if norm is not None and len(norms) == len(self.history):
            g = statistics.median(norms)
            if norm > self.grad_factor * g:
                return f"gradient norm {norm:.4g} > {self.grad_factor:g} x median {g:.4g} of the last {self.window} steps"
        return None

    def check(self, step: int, stats, step_weight, grad_norm=None) -> bool:
        """``stats``: the step's summed loss (and gradient norm) over every rank, as the NaN guard
        reduced them; ``step_weight``: the step's loss weight. True: drop this step's update."""
        if step in self.drop:
            self.skipped.append(step)
            if self.main:
                console.print(f"step {step}: skipped (its batch caused the loss spike that was rolled back)")
            return True
        values = stats.double().tolist()
        loss = values[0] / max(float(step_weight), 1e-12)
        world = self.accelerator.num_processes if self.accelerator is not None else 1
        norm = values[1] / world if grad_norm is not None and len(values) > 1 else None  # summed over ranks
        if not math.isfinite(loss) or (norm is not None and not math.isfinite(norm)):
            return False  # the NaN guard's business
        why = self.rule(loss, norm)
        if why is None:
            self.history = (self.history + [(step, loss, norm)])[-self.window:] if self.window else []
            return False
        action = self.mode
        if action == "rollback" and not self._has_checkpoint():
            action = "skip (no checkpoint to roll back to)"
        rec = {"step": step, "spike": True, "spike_loss": loss, "spike_grad_norm": norm, "spike_why": why,
               "spike_action": action}
        self.records.append(rec)
        self.logger.log(rec)
        if self.main:
            hint = "" if self.mode != "warn" else " (train.on_spike=skip drops such updates, rollback reloads)"
            console.print(f"[yellow]step {step}: loss spike: {why}; {action}{hint}[/]", soft_wrap=True)
        if self.mode == "warn":
            return False
        undone = len(set(self.skipped) | self.drop)
        if undone >= self.max_skips:
            raise TrainingDiverged(
                f"step {step}: loss spike ({why}); {undone} step(s) were already skipped "
                f"or rolled back, the limit train.max_skipped_steps={self.max_skips}, so the run stopped\n"
                "  → lower train.lr, check the data around these steps, or raise train.spike_factor")
        if action == "rollback":
            self.drop.add(step)
            raise Rollback(step)
        self.skipped.append(step)
        return True

    # -- checkpoints

    def _has_checkpoint(self) -> bool:
        """Whether there is a checkpoint to roll back to, the same answer on every rank (rank 0's
        background save put in place first)."""
        found = list_checkpoints(self.logger.path.parent, wait=True)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            found = list_checkpoints(self.logger.path.parent)
        return bool(found)

    def state(self) -> dict:
        """What a checkpoint keeps: the window, the spikes so far and the steps a rollback drops."""
        return {"spike_window": [list(h) for h in self.history], "spike_drop": sorted(self.drop),
                "spike_skipped": self.skipped, "spike_records": self.records}

    def restore(self, state: dict) -> None:
        """Back to a checkpoint's state (a resume, or a rollback)."""
        step = state.get("step", 0)
        self.history = [tuple(h) for h in state.get("spike_window", []) if h[0] <= step]
        self.drop |= set(state.get("spike_drop", []))
        self.skipped = [s for s in state.get("spike_skipped", []) if s <= step]
        self.records = [r for r in state.get("spike_records", []) if r["step"] <= step]

    def summary(self) -> dict:
        """For ``final_metrics.json``."""
        out = {"loss_spikes": len(self.records)} if self.records else {}
        if self.skipped:
            out["spike_steps_skipped"] = len(self.skipped)
        return out


def rollback(run, skipped: list[int]) -> list[int]:
    """Reload the newest intact checkpoint into ``run`` (the loop starts again at its step) and return
    the NaN-skipped steps still behind it."""
    spikes, acc = run.spikes, run.accelerator
    run.optimizer.zero_grad(set_to_none=True)
    spike = max(spikes.drop)
    current = [r for r in spikes.records if r["step"] == spike]
    state = load_checkpoint(acc, run.out_dir)
    run.start_step = step = state["step"]
    spikes.restore(state)
    spikes.drop.add(spike)
    spikes.records += current
    run.feed.restore(state["path"], step)
    if run.distill is not None:  # the logged divergence of the abandoned steps goes with them
        run.distill.forget()
    if run.main:
        truncate_metrics(run.out_dir, step)
        for rec in spikes.records:
            if rec["step"] > step:
                spikes.logger.log(rec)
        replay = f"steps {step + 1}-{spike - 1} are replayed, " if spike - 1 > step else ""
        console.print(f"[yellow]rolled back to {state['path']} (step {step}): {replay}the batch of step {spike} is "
                      "skipped[/]", soft_wrap=True)
    return [s for s in skipped if s <= step]
