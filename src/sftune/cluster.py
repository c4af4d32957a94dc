"""Long runs on a cluster: preemption (SIGTERM), time-based checkpoints, ``train.resume=auto``,
torchrun restarts, and a deterministic end of a distributed run.

* :class:`Preemption` turns SIGTERM (what SLURM, Kubernetes and spot instances send first) into
  the Ctrl-C path of :class:`~sftune.faults.StepBoundary`: a checkpoint at a step boundary, RNG
  and data position included, then exit status :data:`REQUEUE_EXIT`. One process stops at once
  (the partial step is undone) when the current step would not end within half of
  ``train.preempt_grace_seconds`` (the other half is for the save), else at the end of the step. Several ranks always stop at a
  step boundary, the same on every rank: at each boundary the ranks all-reduce two flags (a
  SIGTERM arrived here; ``train.save_every_minutes`` is due on rank 0's clock), one tiny
  collective per step.
* :func:`resolve_resume` decides ``train.resume=auto`` (and the default, ``None``): resume from
  the newest checkpoint when one exists and the saved config matches, else start fresh, in one line.
* :func:`rendezvous_kwargs` gives every torchrun attempt its own namespace in the launcher's
  store (torchrun's static rendezvous keeps one store across ``--max-restarts`` attempts, so a
  restarted rank could read the dead attempt's gloo addresses: "connectFullMesh failed ...
  Connection refused").
* :func:`end_distributed` frees the DDP model and destroys the process group in an order that
  cannot deadlock at interpreter exit.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import threading
import time
from pathlib import Path

from sftune.console import console

REQUEUE_EXIT = 75
"""Exit status of a preempted run that saved its state: ``EX_TEMPFAIL`` of sysexits.h, "a temporary
failure, try again". Distinct from 130 (Ctrl-C: the user stopped it), 2 (bad input) and 1 (a crash)."""


class Preempted(KeyboardInterrupt):
    """SIGTERM: stop at a step boundary and save (caught by the loop where Ctrl-C is)."""


# ----------------------------------------------------------------------------- SIGTERM and time-based saves


def _age(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m" if seconds < 3600 else \
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Preemption:
    """The SIGTERM handler, the per-step agreement of all ranks, and the checkpoint clock.

    ``with preemption.handling():`` installs the handler (main thread only) for the loop and the
    final save; :meth:`watch` is given the loop's :class:`~sftune.faults.StepBoundary`;
    :meth:`at_boundary` is called on every rank after every step and returns ``(stop, save)``;
    :meth:`saved` is called after every checkpoint.
    """

    def __init__(self, grace_s: float, save_every_minutes: float | None, accelerator=None):
        self.grace_s, self.save_every_s = grace_s, (save_every_minutes or 0) * 60
        self.accelerator = accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.requested: float | None = None  # when SIGTERM arrived (monotonic)
        self.raised = False
        self.boundary = None
        now = time.monotonic()
        self.last_save = self.last_boundary = now
        self.step_s: float | None = None  # the slowest recent step (seconds)

    # -- the handler

    def watch(self, boundary) -> None:
        self.boundary = boundary
        self.last_boundary = time.monotonic()

    def handling(self):
        return _Handler(self)

    def _on_sigterm(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested is None:
            self.requested = now
        b = self.boundary
        if self.world > 1 or self.raised or b is None or b.committing:
            return  # several ranks: at the next boundary, together; the update itself: at its end
        if b.in_step:  # finish the step only when it ends within half the grace (the rest is for the save)
            left = self.step_s - (now - b.started) if self.step_s is not None else math.inf
            if left <= self.grace_s / 2:
                return
        self.raised = True  # between steps (eval, a checkpoint) or a step too long: the last boundary
        raise Preempted

    # -- the step boundary

    def at_boundary(self, done: int) -> tuple[bool, bool]:
        """Whether to stop (a SIGTERM reached any rank) and whether a time-based checkpoint is due
        (rank 0's clock), agreed by every rank. Call on every rank after every step."""
        now = time.monotonic()
        began = self.boundary.started if self.boundary is not None else self.last_boundary
        took, self.last_boundary = now - began, now  # the step alone, not the evals and saves before it
        self.step_s = took if self.step_s is None else max(took, 0.8 * self.step_s)
        acc = self.accelerator
        due = bool(self.save_every_s) and now - self.last_save >= self.save_every_s \
            and (acc is None or acc.is_main_process)
        stop = self.requested is not None
        if self.world > 1:
            import torch

            flags = torch.tensor([float(stop), float(due)], device=acc.device)
            flags = acc.reduce(flags, reduction="sum")
            stop, due = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
        if stop and (acc is None or acc.is_main_process):
            console.print(f"\n[yellow]SIGTERM (preemption): stopping at the end of step {done}[/]")
        return stop, due

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def checkpoint_age(self) -> float:
        """Seconds since the last checkpoint (or the start of this run): the work a preemption would lose."""
        return time.monotonic() - self.last_save

    def progress_field(self) -> str:
        return f"  ckpt {_age(self.checkpoint_age())} ago"


class _Handler:
    def __init__(self, preemption: Preemption):
        self.preemption, self.previous = preemption, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.preemption._on_sigterm)
        return self.preemption

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


# ----------------------------------------------------------------------------- resume=auto

RESTART_VARS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")


def launch_restart() -> str | None:
    """``NAME=N`` when the launcher says this is a restart (N > 0), else ``None``."""
    for name in RESTART_VARS:
        value = os.environ.get(name, "0")
        if value.isdigit() and int(value) > 0:
            return f"{name}={value}"
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_differences(cfg, saved_yaml: Path) -> list[str]:
    """The keys (``key: saved -> now``) where ``cfg`` differs from a run's ``sftune_config.yaml``,
    leaving out those that do not change what is trained."""
    import yaml

    from sftune.config import UNTRAINED, config_to_yaml, keys_with

    untrained = set(keys_with(UNTRAINED))  # declared in the schema: they do not change what is trained
    try:
        saved = _flat(yaml.safe_load(saved_yaml.read_text()) or {})
    except (OSError, yaml.YAMLError) as e:
        return [f"{saved_yaml.name} does not load ({type(e).__name__})"]
    now = _flat(yaml.safe_load(config_to_yaml(cfg)))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in untrained and saved.get(k) != now.get(k)]


def resolve_resume(cfg, out_dir: Path, world: int, show: bool) -> bool:
    """``train.resume`` as a yes/no for this launch. ``true``/``false`` as given; ``auto`` resumes
    when ``out_dir`` holds a checkpoint of this config and world size and the run is not complete;
    unset (``None``) is ``auto`` when the launcher says this is a restart, else ``false``.
    Prints one line when it was decided here (``show``: the main process)."""
    import json

    from sftune.checkpoint import list_checkpoints

    mode = cfg.train.resume
    why_auto = "train.resume=auto"
    if mode is None:
        restart = launch_restart()
        if restart is None:
            return False
        why_auto = f"a restart ({restart}), so train.resume=auto"
    elif mode != "auto":
        return bool(mode)
    ckpts = list_checkpoints(out_dir)

    def say(text: str) -> None:
        if show:
            console.print(f"{why_auto}: {text}", markup=False, highlight=False, soft_wrap=True)

    if not ckpts:
        say(f"starting fresh ({out_dir}/checkpoints holds no checkpoint)")
        return False
    if (out_dir / "final_metrics.json").exists():
        say(f"starting fresh (the run in {out_dir} is complete)")
        return False
    diffs = config_differences(cfg, out_dir / "sftune_config.yaml")
    if diffs:
        say(f"starting fresh (the checkpoints in {out_dir} are of another config: {'; '.join(diffs[:3])}"
            f"{'; ...' if len(diffs) > 3 else ''})")
        return False
    try:
        saved_world = json.loads((ckpts[-1] / "trainer_state.json").read_text()).get("world_size", 1)
    except (OSError, ValueError):
        saved_world = world  # a damaged newest checkpoint: load_checkpoint names it and tries the previous one
    if saved_world != world:
        say(f"starting fresh ({ckpts[-1].name} was made with {saved_world} process(es), this run has {world})")
        return False
    say(f"resuming from the newest checkpoint, {ckpts[-1].name}")
    return True


# ----------------------------------------------------------------------------- torchrun attempts

_SCHEME = "sftune-attempt"


def _attempt_rendezvous(url: str, timeout=None, **kwargs):
    """env:// with the store under ``sftune/attempt-N/`` (N: TORCHELASTIC_RESTART_COUNT)."""
    import torch.distributed as dist

    from torch.distributed.constants import default_pg_timeout

    store, rank, world = next(dist.rendezvous("env://", timeout=timeout or default_pg_timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    yield dist.PrefixStore(f"sftune/attempt-{attempt}", store), rank, world
    raise RuntimeError("sftune-attempt:// cannot re-rendezvous; torchrun restarts the processes instead")


def rendezvous_kwargs() -> list:
    """Accelerate kwargs handlers for a launch by torchrun that shares the launcher's store between
    attempts (``TORCHELASTIC_USE_AGENT_STORE=True``): each attempt's process group keys go under
    their own prefix, so a restarted rank never reads a dead attempt's addresses. Empty otherwise."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return []
    import torch.distributed as dist
    from accelerate.utils import InitProcessGroupKwargs

    if dist.is_initialized():
        return []
    try:
        dist.register_rendezvous_handler(_SCHEME, _attempt_rendezvous)
    except RuntimeError:  # registered by an earlier run in this process
        pass
    return [InitProcessGroupKwargs(init_method=f"{_SCHEME}://")]


# ----------------------------------------------------------------------------- a lost rank

_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connectFullMesh",
              "NCCL communicator was aborted", "Socket Timeout")


def peer_lost(e: BaseException) -> str | None:
    """One clear line for a collective that failed because another rank died, else ``None``."""
    text = str(e)
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not any(s in text for s in _PEER_GONE):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return (f"rank {os.environ.get('RANK', '?')}: another rank of this run is gone ({first[:200]})\n"
            "  → see that rank's log for why; torchrun --max-restarts=N restarts the group, which resumes from "
            "the last checkpoint (train.resume=auto is the default on a restart)")


# ----------------------------------------------------------------------------- the end of a distributed run


def end_distributed(run) -> None:
    """Free the DDP/FSDP-wrapped model and the optimizer, then destroy the process group, every rank
    together: nothing of gloo's is left for the garbage collector to tear down at interpreter exit
    (where the DDP reducer's destructor joined a gloo thread that waited for the GIL: a hang)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    acc = run.accelerator
    acc.wait_for_everyone()  # no collective is in flight on any rank
    run.lm = run.optimizer = run.scheduler = None
    acc.free_memory()  # accelerate's own references to the prepared model and optimizer
    gc.collect()  # the reducer goes now, while the process group (and the GIL) are in a known state
    dist.barrier()
    dist.destroy_process_group()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a later train() in this process starts anew


# ----------------------------------------------------------------------------- exit status


def exit_status(result, *, resume_hint: str) -> int:
    """The exit status of a training result, with one line on how to continue: 75 (requeue) after a
    SIGTERM, 130 after Ctrl-C (``resume_hint`` says how to resume), 0 when done."""
    if result.preempted:  # SIGTERM: the state is saved; the same command continues
        console.print(f"preempted: saved at step {result.steps}; exit status {REQUEUE_EXIT} (requeue). The same "
                      "command with train.resume=auto continues (auto is the default on a torchrun or SLURM "
                      "restart)", markup=False, highlight=False, soft_wrap=True)
        return REQUEUE_EXIT
    if result.interrupted:
        console.print(f"to resume from step {result.steps}: {resume_hint}", markup=False, highlight=False,
                      soft_wrap=True)
        return 130
    return 0
