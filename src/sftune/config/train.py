"""The ``train`` and ``eval`` config sections: the training loop (steps, batch, optimizer, schedule,
checkpoints, faults and spikes, the cluster) and generation-based evaluation."""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import Field

from sftune.config.roles import UNTRAINED, Role, Section as _Section, Untrained


class TrainConfig(_Section):
    output_dir: Untrained[str | None] = None
    """Where checkpoints, metrics and the final model go. ``None`` is ``runs/<recipe name>``."""

    epochs: float = Field(3.0, gt=0, allow_inf_nan=False)
    """Passes over the training data (ignored when ``max_steps`` is set)."""

    max_steps: int | None = Field(None, ge=1)
    """Number of optimizer steps; overrides ``epochs``."""

    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch on each device (packed sequences when ``data.packing``)."""

    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""

    lr: float = Field(5e-5, gt=0, allow_inf_nan=False)
    """Peak learning rate."""

    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    """AdamW weight decay; never applied to biases and norm weights."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    adam_eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    """AdamW epsilon."""

    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""

    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0 (used when ``warmup_steps`` is 0)."""

    warmup_steps: int = Field(0, ge=0)
    """Warmup steps; overrides ``warmup_ratio``."""

    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    """Clip the global gradient norm to this value; ``None`` turns clipping off."""

    seed: int = 42
    """Seed for weight initialisation, dropout and the data order."""

    log_every: Untrained[int] = Field(10, ge=1)
    """Log train loss, learning rate and tokens/s every N steps."""

    eval_every: Untrained[int | None] = Field(None, ge=1)
    """Evaluate on the eval split every N steps (and at the end). ``None``: only at the end."""

    save_every: Untrained[int | None] = Field(None, ge=1)
    """Save a checkpoint every N steps. ``None``: no intermediate checkpoints."""

    keep_checkpoints: Untrained[int] = Field(2, ge=1)
    """Keep only the newest K checkpoints."""

    resume: Untrained[Union[bool, Literal["auto"], None]] = None
    """``true``: continue from the newest checkpoint in ``output_dir`` (refused when there is
    none). ``false``: a fresh run (an earlier run's files are moved to ``previous-N/``). ``auto``:
    resume when ``output_dir`` holds a checkpoint of this config (keys that do not change what is
    trained, such as ``save_every``, may differ) and world size and the run is not complete, else
    start fresh; one line says which. Unset: ``auto`` when the launch is a restart
    (``TORCHELASTIC_RESTART_COUNT`` or ``SLURM_RESTART_COUNT`` above 0: torchrun
    ``--max-restarts``, a SLURM requeue), else ``false``: a first launch is only a continuation
    when the command says so. Put ``train.resume=auto`` in jobs that other schedulers requeue."""

    report_to: Untrained[list[Literal["tensorboard", "wandb"]]] = []
    """Extra metric loggers. Metrics always go to ``output_dir/metrics.jsonl``."""

    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast precision of the forward and backward (through accelerate). ``auto`` is ``bf16`` on
    a GPU that supports it (as TRL's default), ``no`` (fp32) on CPU and on GPUs without bf16.
    ``bf16``/``fp16`` run matmuls and attention in half precision while the weights, gradients and
    optimizer states stay in ``model.dtype`` (see there); ``fp16`` adds loss scaling. The fused
    loss accumulates in fp32 in every setting."""

    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """``adamw``: torch's fused AdamW, states in the parameters' dtype. ``adamw_8bit``:
    bitsandbytes' 8-bit AdamW (the two states in 8 bits: 2 instead of 8 bytes per fp32
    parameter); CUDA only, ``pip install 'sftune[gpu]'``."""

    compile: bool = False
    """Run the model through ``torch.compile``."""

    bucket: Union[int, Literal["auto"]] = "auto"
    """Pad each micro-batch's rows to a multiple of this many tokens (padding carries no loss and
    changes no example's result), so ``torch.compile`` meets a few shapes instead of one per
    batch. ``auto``: 128 with ``train.compile``, else 0 (no padding)."""

    num_threads: Untrained[int | None] = Field(None, ge=1)
    """CPU threads for torch; a number pins it. ``None`` (on CPU, without ``OMP_NUM_THREADS`` set):
    sftune starts from the cores idle now, measures the first steps at that count and one fewer or
    more, and re-checks when steps slow down (``sftune.threads``; results equal to fp32 rounding)."""

    on_nonfinite: Literal["stop", "skip"] = "stop"
    """What a non-finite (NaN or infinite) loss or gradient norm does: ``stop`` ends the run with an
    error naming the step and the value, keeps the last good checkpoint and writes no final model;
    ``skip`` drops that step's update (the weights and optimizer state stay as they were), counts
    it, and stops once more than ``max_skipped_steps`` steps were skipped."""

    max_skipped_steps: int = Field(10, ge=0)
    """With ``on_nonfinite=skip`` (or ``on_spike`` skip / rollback): the most steps that may be skipped
    before the run stops."""

    on_spike: Literal["warn", "skip", "rollback"] = "warn"
    """A loss spike (see ``spike_window``): ``warn`` logs it and trains on; ``skip`` drops that update
    as ``on_nonfinite=skip`` does; ``rollback`` reloads the newest intact checkpoint and replays to the
    spike, skipping the spiking batch (deterministic). Spikes are logged, charted and counted."""

    spike_window: int = Field(20, ge=0)
    """N: a step is a spike against the median of the last N normal steps (no check until N steps are
    seen: the warm-up). 0 turns spike detection off."""

    spike_factor: float = Field(3.0, gt=1, allow_inf_nan=False)
    """k: a step's loss is a spike above k x the window's median loss (and ``spike_min_jump`` above it)."""

    spike_min_jump: float = Field(1.0, ge=0, allow_inf_nan=False)
    """The absolute floor of a loss spike: it must also exceed the median by this much (nats)."""

    spike_grad_factor: float = Field(10.0, gt=1, allow_inf_nan=False)
    """A gradient norm (before clipping; with ``max_grad_norm``) above this x the window's median is a spike."""

    save_every_minutes: Untrained[float | None] = Field(None, gt=0, allow_inf_nan=False)
    """Also save a checkpoint when this many minutes have passed since the last one (rank 0's clock,
    agreed by every rank at a step boundary), so a preempted or crashed run loses at most about
    that much work. Works alone or with ``save_every``. ``None``: by steps only."""

    preempt_grace_seconds: Untrained[float] = Field(30.0, ge=0, allow_inf_nan=False)
    """The time between SIGTERM and SIGKILL that the scheduler gives (SLURM ``KillWait``, Kubernetes
    ``terminationGracePeriodSeconds``, torchrun: 30 s). On SIGTERM one process finishes the current
    step when it ends within half of this, else undoes it; then saves a checkpoint at that step
    boundary and exits with status 75 ("requeue me"). Several ranks always stop together at the
    end of the current step."""


class EvalConfig(_Section):
    section_roles: ClassVar[tuple[Role, ...]] = (UNTRAINED,)
    exact_match: bool = False
    """Generate greedily for the eval prompts and report exact-match accuracy before and after
    training (prompt/completion data)."""

    limit: int | None = Field(200, ge=1)
    """Eval examples used for generation metrics."""

    max_new_tokens: int = Field(64, ge=1)
    """Longest generation."""

    batch_size: int = Field(32, ge=1)
    """Prompts per generation batch."""

    samples: int = Field(3, ge=0)
    """Sample generations shown and logged at each evaluation."""
