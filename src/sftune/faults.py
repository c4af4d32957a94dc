"""Faults during a run: non-finite numbers and Ctrl-C between steps.

The training loop calls these helpers with a line or two each:

* :class:`NonFiniteGuard` checks each step's loss and gradient norm before the optimizer step;
  ``train.on_nonfinite=stop`` ends the run (:class:`TrainingDiverged`), ``skip`` drops the update
  and counts it, up to ``train.max_skipped_steps``.
* :class:`StepBoundary` remembers the RNG states at the start of the current step, so a Ctrl-C in
  the middle of a step saves the state of the step boundary (the interrupted step's dropout draws
  are undone), and resume is bit-exact with the uninterrupted run (on CPU, with the thread count
  pinned: :mod:`sftune.threads`). The optimizer update and the
  step's log record are shielded from Ctrl-C, so a step is either wholly done or not begun.

The JSON writer and the disk-full wrapper that every writer of run files uses live in the leaf
module :mod:`sftune.safeio`.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time

from sftune.errors import SftuneError

# torch and numpy are imported where they are used.


class TrainingDiverged(SftuneError):
    """The loss or the gradient norm became NaN or infinite."""


def _describe(value) -> str:
    if value is None:
        return "-"
    v = float(value)
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.6g}"


class NonFiniteGuard:
    """Checks one step's summed loss and gradient norm; ``check`` returns True when the step's
    update must be skipped and raises :class:`TrainingDiverged` when the run must stop."""

    def __init__(self, mode: str, max_skips: int, accelerator=None, last_checkpoint=None):
        """``last_checkpoint()`` returns the newest checkpoint's path (or ``None``), for the message."""
        self.mode, self.max_skips = mode, max_skips
        self.accelerator, self.last_checkpoint = accelerator, last_checkpoint
        self.skipped: list[int] = []

    def check(self, step: int, loss_sum, grad_norm=None) -> bool:
        import torch

        values = [loss_sum.detach().double().reshape(())]
        if grad_norm is not None:
            values.append(torch.as_tensor(grad_norm, dtype=torch.float64, device=values[0].device).reshape(()))
        stats = torch.stack(values)
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:  # every rank decides the same way
            stats = acc.reduce(stats, reduction="sum")
        self.stats = stats  # the step's loss (and gradient norm) over every rank: sftune.spikes reads them
        if bool(torch.isfinite(stats).all()):
            return False
        loss = stats[0].item()
        norm = stats[1].item() if grad_norm is not None else None
        what = []
        if not math.isfinite(loss):
            what.append(f"the loss is {_describe(loss)}")
        if norm is not None and not math.isfinite(norm):
            what.append(f"the gradient norm is {_describe(norm)}")
        what = " and ".join(what)
        if self.mode == "skip" and len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            return True
        if self.mode == "skip":
            raise TrainingDiverged(
                f"step {step}: {what}; {len(self.skipped)} step(s) were already skipped (steps "
                f"{', '.join(map(str, self.skipped[:10]))}), the limit train.max_skipped_steps={self.max_skips}, "
                f"so the run stopped. {self._kept()}\n  → lower train.lr, or check the data and the model weights")
        raise TrainingDiverged(
            f"step {step}: {what}, so the run stopped before this update. {self._kept()}\n"
            f"  → lower train.lr (it is applied at every step), set train.max_grad_norm, check the model weights, "
            f"or set train.on_nonfinite=skip to skip such steps")

    def _kept(self) -> str:
        path = self.last_checkpoint() if self.last_checkpoint is not None else None
        last = f"The last good checkpoint is {path}" if path else "There is no checkpoint"
        return f"{last}; no final model was written."


# ----------------------------------------------------------------------------- step boundaries and Ctrl-C


def rng_states() -> dict:
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class StepBoundary:
    """The last step boundary: the number of completed steps and the RNG states at that point.

    Call :meth:`begin` at the start of each step, run the optimizer update inside :meth:`commit`
    and call :meth:`settle` once the step's record is logged: a Ctrl-C from the start of the update
    to ``settle`` is held back until then, so a step is either wholly done (and logged) or not
    begun. After a Ctrl-C, :meth:`rewind` restores the RNG states of the boundary, discards the
    partial step's gradients, and returns the step to save a checkpoint at. A second Ctrl-C while
    one is held back interrupts at once.
    """

    def __init__(self, step: int):
        self.step, self._rng, self._held, self._previous = step, None, [], None
        self.in_step = self.committing = False  # read by the SIGTERM handler (sftune.cluster)
        self.started = time.monotonic()  # when the current step began

    def begin(self, step: int) -> None:
        self.settle()
        self.step, self._rng = step, rng_states()
        self.started, self.in_step = time.monotonic(), True

    @contextlib.contextmanager
    def commit(self, done: int):
        self._hold()
        self.in_step, self.committing = False, True
        try:
            yield
            self.step, self._rng = done, None  # before committing ends: a SIGTERM then saves ``done``
        except BaseException:
            self._release()
            raise
        finally:
            self.committing = False

    def settle(self) -> None:
        """Let a held-back Ctrl-C through (as :class:`KeyboardInterrupt`)."""
        if self._release():
            raise KeyboardInterrupt

    def rewind(self, optimizer=None) -> int:
        self._release()
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return self.step

    def _hold(self) -> None:
        if self._previous is not None or threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # not the main thread, or someone else handles Ctrl-C: leave it alone
        self._held = []

        def hold(signum, frame):
            if self._held:  # a second Ctrl-C: now
                self._release()
                raise KeyboardInterrupt
            self._held.append(signum)

        self._previous = signal.signal(signal.SIGINT, hold)

    def _release(self) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        held, self._held = bool(self._held), []
        return held
