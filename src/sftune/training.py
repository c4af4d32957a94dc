"""Training: :func:`setup` builds a :class:`Run`, :func:`loop` trains it, :func:`finish` saves and reports.

Read :func:`loop` top to bottom: forward, loss, backward, step. Loss normalisation, in plain sight:
the loss of an optimizer step is the sum of the token losses of all its micro-batches on all ranks,
divided by the loss weight of the whole step (the number of loss tokens, or their summed per-message
weights). Each micro-batch's backward therefore uses ``loss_sum * world_size / step_weight``: the
weight is all-reduced once per step, and ``world_size`` undoes DDP's gradient averaging. So
``1 x 8``, ``4 x 2`` and ``2 ranks x 4`` produce the same gradients (tested).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from rich.markup import escape

from sftune.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, saves_finished
from sftune.cluster import Preempted, Preemption, end_distributed, rendezvous_kwargs, resolve_resume
from sftune.config import Config, config_to_yaml
from sftune.data.chain import DataPlan, plan, prepare, require_steps
from sftune.data.one_source import PreparedData
from sftune.digests import forget_model
from sftune.distill import attach as attach_distillation, step_batches
from sftune.distributed import fill_deepspeed_batch_size, is_sharded, whole_root
from sftune.errors import ConfigError
from sftune.eval_metrics import eval_loss, generation_eval, sample_generations
from sftune.export.save import save_final
from sftune.faults import NonFiniteGuard, StepBoundary
from sftune.safeio import disk_errors, dumps
from sftune.speedups import apply_kernels, bucket_for, device_metrics, needs_checkpointing
from sftune.loss import CausalLMWithLoss
from sftune.model import (add_lora, count_parameters, fast_activations, load_model, load_model_config,
                          load_tokenizer, resolve_max_length)
from sftune.probe import choose_layout
from sftune.optim import make_optimizer, make_scheduler
from sftune.vision_parts import prepare_parts
from sftune import threads as cpu_threads
from sftune.run_report import build_report
from sftune.runlock import RunLock, check_output_dir, set_aside_earlier_run
from sftune.spikes import Rollback, SpikeGuard, rollback
from sftune.console import (MetricsLogger, console, is_main_process, quiet_third_party, training_progress,
                            truncate_metrics)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    train_loss: float | None
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    preempted: bool = False
    """Stopped by SIGTERM (a scheduler's preemption) after saving: the CLI exits with status 75."""


# ----------------------------------------------------------------------------- setup helpers


def make_accelerator(cfg: Config):
    """The accelerate state: devices, mixed precision, and the engine chosen at launch (DDP, FSDP,
    DeepSpeed). Refuses set-ups that cannot work, with the fix."""
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if use_ds and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("this launch uses a DeepSpeed config, but DeepSpeed is not installed: "
                          "pip install 'sftune[deepspeed]' (or launch with configs/accelerate/ddp.yaml or fsdp.yaml)")
    if cfg.lora.load_in_4bit and (use_fsdp or use_ds):
        raise ConfigError("QLoRA (lora.load_in_4bit) is not supported under FSDP or DeepSpeed in sftune; "
                          "launch it with DDP (configs/accelerate/ddp.yaml), or use plain LoRA under FSDP/ZeRO-3")
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # launched by torchrun / accelerate on a machine without GPUs: several CPU processes over gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # DeepSpeed runs its own accumulation and clipping: tell it the step structure
    extra = {}
    if use_ds:
        extra = {"gradient_accumulation_steps": cfg.train.grad_accum}
        for key, value in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", cfg.train.grad_accum),
                           ("ACCELERATE_GRADIENT_CLIPPING", cfg.train.max_grad_norm or 0.0)):
            if os.environ.get(key, "auto") == "auto":
                os.environ[key] = str(value)
    accelerator = Accelerator(mixed_precision=mp, cpu=multi_cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                                              *rendezvous_kwargs()], **extra)
    if use_ds:
        fill_deepspeed_batch_size(accelerator, cfg.train.batch_size)
    return accelerator


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything a training run is made of, built once by :func:`setup` and read by :func:`loop`
    and :func:`finish`. ``lm`` and ``optimizer`` are as ``accelerator.prepare`` returned them."""

    cfg: Config
    accelerator: Any
    out_dir: Path
    tokenizer: Any
    data: PreparedData
    feed: DataPlan
    """The batches of each step, the data position and the report (:mod:`sftune.data.chain`)."""
    lm: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    logger: MetricsLogger
    total_steps: int
    start_step: int = 0
    before: dict | None = None
    """Held-out exact match before training (when ``eval.exact_match``)."""
    cluster: Preemption | None = None
    """SIGTERM, the per-step agreement of the ranks and the checkpoint clock (:mod:`sftune.cluster`)."""
    threads: Any = None
    """Fits the CPU thread count to the machine between steps (:mod:`sftune.threads`)."""
    spikes: Any = None
    """Loss spikes: the window of recent steps, ``train.on_spike`` (:mod:`sftune.spikes`)."""
    distill: Any = None
    """The distillation objective on ``lm`` (:mod:`sftune.distill`), or None."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return is_sharded(self.accelerator)

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def generates(self) -> bool:
        """Generation runs on rank 0; sharded models (FSDP, ZeRO-3) need every rank in every forward."""
        return self.main or self.sharded

    def model(self):
        """The causal LM (peft or plain) inside the prepared wrapper."""
        return self.accelerator.unwrap_model(self.lm).model

    def exact_match(self, label: str) -> dict:
        with whole_root(self.lm):  # FSDP2: the root's own parameters gathered for generate()
            return generation_eval(self.cfg, self.model(), self.tokenizer, self.data, label=label, show=self.main,
                                   synced=self.sharded)

    def evaluate(self, step: int) -> dict:
        """Eval loss / perplexity, and a few fixed sample prompts generated, logged with the metrics."""
        if self.data.eval is None:
            return {}
        cfg = self.cfg
        m = eval_loss(self.lm, self.data.eval, batch_size=cfg.train.batch_size, max_length=self.data.max_length,
                      pad_id=self.tokenizer.pad_token_id, device=self.device, packing=cfg.data.packing,
                      accelerator=self.accelerator)
        self.logger.log({"step": step, **m})
        if self.main:
            console.print(f"step {step}: eval loss {m['eval_loss']:.4f}, perplexity {m['eval_ppl']:.2f}")
        if self.generates and cfg.eval.samples:
            with whole_root(self.lm):
                samples = sample_generations(cfg, self.model(), self.tokenizer, self.data, synced=self.sharded)
            self.logger.log({"step": step, "label": f"step {step}", "samples": samples})
            if self.main:
                for smp in samples[:2]:
                    console.print(f"  [dim]{escape(repr(smp['prompt'][-60:]))}[/] → {escape(repr(smp['generated'][:80]))}")
        return m

    def save(self, step: int, wait: bool = False) -> None:  # wait: in place on return, not hashed in the background
        save_checkpoint(self.accelerator, self.out_dir, step,
                        {"world_size": self.world, "epoch": self.feed.epoch(step), "total_steps": self.total_steps,
                         **self.spikes.state()}, self.cfg.train.keep_checkpoints,
                        files=self.feed.position_files(step), background=not wait)
        if self.cluster is not None:
            self.cluster.saved()
        self.logger.notify({"step": step, "event": "save"})


def setup(cfg: Config, *, model=None, tokenizer=None, source=None, fmt=None, sinks=()) -> Run:
    """Data, model, layout, loss, optimizer, schedule and state: everything before the first step."""
    quiet_third_party()
    accelerator = make_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    threads = cpu_threads.for_training(cfg.train.num_threads, device, main)  # the cores idle now, not all of them
    out_dir = Path(cfg.train.output_dir)
    resume = resolve_resume(cfg, out_dir, accelerator.num_processes, main)  # a restarted job continues its own run
    if resume is True and not list_checkpoints(out_dir):
        raise ConfigError(f"train.resume=true but {out_dir}/checkpoints holds no checkpoint to resume from")
    set_seed(cfg.train.seed)
    require_steps(cfg)

    # data: rows -> formatted sequences -> ids + labels (+ weights)
    n_added = 0
    if tokenizer is None:
        tokenizer, n_added = load_tokenizer(cfg)
    model_config = model.config if model is not None else load_model_config(cfg)
    max_length = resolve_max_length(cfg, tokenizer, model_config)
    with accelerator.main_process_first():
        data: PreparedData = prepare(cfg.data, tokenizer, max_length, source=source, fmt=fmt, seed=cfg.train.seed)

    # the model, then the row layout and loss it can take, checked on a few of this run's examples
    if model is None:
        model = load_model(cfg, tokenizer, n_added, device)
    elif cfg.lora.enabled and not hasattr(model, "peft_config"):
        model = add_lora(cfg, model)
    fast_activations(model)
    model = apply_kernels(cfg.model.kernels, model, device)  # before the probe, so it checks the patched model
    choice = choose_layout(cfg, model, data, data.report, console if main else None, device, is_sharded(accelerator))
    feed = plan(cfg, data, tokenizer.pad_token_id, layout=choice.layout, rank=accelerator.process_index,
                world=accelerator.num_processes, hidden_size=getattr(model_config, "hidden_size", 768),
                bucket=bucket_for(cfg, model))
    total_steps = feed.total_steps
    if main:
        data.report.render(console, title="Training data")
        if cfg.train.eval_every and data.eval is None:
            console.print(f"note: train.eval_every={cfg.train.eval_every} is ignored: the data has no eval split "
                          "(set data.eval_split, e.g. data.eval_split=0.05)")
    if needs_checkpointing(cfg, model_config, max_length, device, model):  # when the activations would not fit
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if main:
            console.print("gradient checkpointing: on")
    prepare_parts(cfg, model, console if main else None)  # vision.*: freeze parts, the tower's checkpointing
    trainable, total = count_parameters(model)
    if main:
        console.print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    # loss model, optimizer, schedule; then the engine (DDP, FSDP, DeepSpeed) wraps them
    lm = CausalLMWithLoss(model, fused=choice.fused, layout=choice.layout)
    sharded = is_sharded(accelerator) or accelerator.distributed_type == DistributedType.DEEPSPEED
    distill = attach_distillation(cfg, lm, tokenizer, data, device, console if main else None, sharded)  # sftune.distill
    if cfg.train.compile:
        lm.compile(dynamic=True)
    optimizer = make_optimizer(cfg, lm, device)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    lm, optimizer = accelerator.prepare(lm, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    logger = MetricsLogger(out_dir, cfg.train.report_to, main, cfg.model_dump(mode="json"), sinks=sinks)
    run = Run(cfg, accelerator, out_dir, tokenizer, data, feed, lm, optimizer, scheduler, logger, total_steps,
              cluster=Preemption(cfg.train.preempt_grace_seconds, cfg.train.save_every_minutes, accelerator),
              threads=threads, spikes=SpikeGuard(cfg.train, logger, accelerator), distill=distill)

    # the quickstart's "before": held-out exact match of the untrained model
    if run.generates and cfg.eval.exact_match and data.source.eval is not None and not resume:
        run.before = run.exact_match("before")

    # resume, or start fresh with the earlier run's files set aside
    if resume:
        state = load_checkpoint(accelerator, out_dir)
        run.start_step = state["step"]
        run.spikes.restore(state)  # the window of recent losses (sftune.spikes)
        feed.restore(state["path"], run.start_step)  # a changed mixture or stream is refused
        if main:
            console.print(f"resumed from {state['path']} at step {run.start_step}", markup=False)
            if truncate_metrics(out_dir, run.start_step):  # steps after the checkpoint were abandoned
                console.print(f"metrics.jsonl: dropped the records after step {run.start_step}")
    elif main:
        set_aside_earlier_run(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        forget_model(out_dir)  # an earlier final model's manifest: its config is overwritten next
        (out_dir / "sftune_config.yaml").write_text(config_to_yaml(cfg))
        (out_dir / "data_report.json").write_text(dumps(data.report.to_dict(), indent=2))
    if data.report.sources:
        logger.log({"step": run.start_step, "data_sources": data.report.sources})
    return run


class LogWindow:
    """Loss, loss weight and tokens since the last log line (this rank); reduced over ranks when logged."""

    def __init__(self, device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.weight = self.real = 0.0
        self.start = time.perf_counter()

    def record(self, run: Run, done: int, grad_norm, skipped: list[int]) -> dict:
        stats = torch.stack([self.loss, self.loss.new_tensor(self.weight), self.loss.new_tensor(self.real)])
        if run.world > 1:
            stats = run.accelerator.reduce(stats, reduction="sum")
        elapsed = time.perf_counter() - self.start
        record = {"step": done, **run.feed.progress(done),
                  "loss": (stats[0] / stats[1].clamp(min=1e-12)).item(), "lr": run.scheduler.get_last_lr()[0],
                  "tokens_per_s": round(stats[2].item() / max(elapsed, 1e-9), 1), "loss_tokens": int(stats[1].item())}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if skipped:
            record["skipped_steps"] = len(skipped)
        record.update(device_metrics(run.device))  # peak GPU memory on CUDA (sftune.speedups)
        if run.distill:  # divergence, cross-entropy, the teacher's own loss and time (sftune.distill)
            record.update(run.distill.record(run.accelerator, run.world))
        self.__init__(self.loss.device)
        return record


@dataclass
class LoopResult:
    step: int
    last_loss: float | None
    interrupted: bool = False
    skipped: list[int] = field(default_factory=list)
    preempted: bool = False


def loop(run: Run, skipped=()) -> LoopResult:
    """The training loop: forward, loss, backward, step. Read it top to bottom. ``skipped``: NaN-skipped
    steps before a rollback (:mod:`sftune.spikes`)."""
    cfg, acc, lm, optimizer = run.cfg, run.accelerator, run.lm, run.optimizer
    lm.train()
    window, last_loss, step = LogWindow(run.device), None, run.start_step
    boundary = StepBoundary(run.start_step)  # Ctrl-C saves the state of the last step boundary, RNG included
    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skipped_steps, acc,
                           lambda: ([None] + list_checkpoints(run.out_dir, wait=True))[-1])
    guard.skipped = list(skipped)
    progress = training_progress(run.main)
    threads = run.threads or cpu_threads.Pinned()  # CPU threads fitted to the machine between steps
    try:
        run.cluster.watch(boundary)  # a SIGTERM stops at a step boundary as Ctrl-C does
        with progress:
            task = progress.add_task("train", total=run.total_steps, completed=run.start_step, loss="-", lr="-",
                                     tps="-", ckpt="")
            for step in range(run.start_step, run.total_steps):
                boundary.begin(step)
                threads.begin()
                micro_batches = step_batches(run, step)  # the data's; on-policy: the student's (sftune.distill)
                # The normaliser: the loss weight of the whole step, over every micro-batch and rank (a
                # plain token count unless messages carry weights). Each micro-batch's backward takes
                # loss_sum / normaliser, so 1x8, 4x2 and 2 ranks x 4 give the same gradients; dividing
                # by world undoes DDP's gradient averaging.
                step_weight = torch.tensor(sum(mb.w_loss for mb in micro_batches), dtype=torch.float64,
                                           device=run.device)
                if run.world > 1:
                    step_weight = acc.reduce(step_weight, reduction="sum")
                normaliser = step_weight.clamp(min=1e-12).to(torch.float32) / run.world
                if run.deepspeed:  # DeepSpeed divides each backward by grad_accum itself: undo that
                    normaliser = normaliser / cfg.train.grad_accum
                step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
                for i, mb in enumerate(micro_batches):
                    sync = i == len(micro_batches) - 1  # gradients are reduced across ranks once, at the end
                    if run.deepspeed:  # DeepSpeed reduces and steps inside backward at the step boundary
                        acc.gradient_state._set_sync_gradients(sync)
                    with contextlib.nullcontext() if sync or run.deepspeed else acc.no_sync(lm):
                        with acc.autocast():
                            loss_sum = lm(**mb.inputs(run.device))  # forward: summed token loss
                        acc.backward(loss_sum / normaliser)  # backward: this micro-batch's share of the mean
                    step_loss += loss_sum.detach().double()
                grad_norm = acc.clip_grad_norm_(lm.parameters(), cfg.train.max_grad_norm) \
                    if cfg.train.max_grad_norm else None
                if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the (already global) norm as a DTensor
                    grad_norm = grad_norm.full_tensor()
                done = step + 1
                skip = guard.check(done, step_loss, grad_norm) or \
                    run.spikes.check(done, guard.stats, step_weight, grad_norm)  # NaN / inf, then spikes
                if run.distill:
                    run.distill.step_end(skip)
                with boundary.commit(done):  # a Ctrl-C from here waits until the step is whole
                    if not skip:
                        optimizer.step()
                        window.loss += step_loss
                        window.weight += sum(mb.w_loss for mb in micro_batches)
                        window.real += sum(mb.real_tokens for mb in micro_batches)
                    run.scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if (done % cfg.train.log_every == 0 or done == run.total_steps) and not skip:
                        record = window.record(run, done, grad_norm, guard.skipped)
                        record["checkpoint_age_s"] = round(run.cluster.checkpoint_age(), 1)
                        run.logger.log(record)
                        last_loss = record["loss"]
                        progress.update(task, loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                        tps=f"{record['tokens_per_s']:,.0f}")
                    progress.update(task, completed=done, ckpt=run.cluster.progress_field())
                boundary.settle()  # a Ctrl-C held back during the update and the log goes through here
                threads.end(sum(mb.real_tokens for mb in micro_batches))
                stop, save_due = run.cluster.at_boundary(done)  # SIGTERM on any rank; save_every_minutes
                if stop and done != run.total_steps:
                    raise Preempted
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != run.total_steps:
                    run.evaluate(done)
                if (save_due or cfg.train.save_every and done % cfg.train.save_every == 0) and done != run.total_steps:
                    run.save(done)
            step = run.total_steps
    except Rollback:  # on_spike=rollback: the newest intact checkpoint reloaded, replayed from there
        return loop(run, rollback(run, guard.skipped))
    except KeyboardInterrupt as stop:
        run.cluster.watch(None)  # a further SIGTERM must not abort the save below
        step = boundary.rewind(optimizer)  # the partial step is undone, RNG included
        preempted = isinstance(stop, Preempted)  # SIGTERM: the scheduler wants the node back
        if run.main:
            console.print(f"\n[yellow]{'preempted' if preempted else 'interrupted'}: saving a checkpoint at step {step}[/]")
        run.save(step, wait=True)
        run.logger.close()
        return LoopResult(step, last_loss, interrupted=True, skipped=guard.skipped, preempted=preempted)
    finally:
        run.cluster.watch(None)  # from here a SIGTERM lets the final save finish
    return LoopResult(step, last_loss, skipped=guard.skipped)


def finish(run: Run, result: LoopResult) -> TrainResult:
    """After the last step: evaluate, save the model, compare with the start, write the report."""
    cfg, main, out_dir = run.cfg, run.main, run.out_dir
    eval_metrics = run.evaluate(run.total_steps)
    if cfg.train.save_every:
        run.save(run.total_steps)
    with disk_errors(out_dir, "the final model"), saves_finished():  # the last checkpoint hashed meanwhile
        save_final(cfg, run.accelerator, run.lm, run.tokenizer, out_dir, run.data)
    metrics = {"train_loss": result.last_loss, **eval_metrics, **run.spikes.summary()}
    if result.skipped:
        metrics["skipped_steps"] = len(result.skipped)
        if main:
            console.print(f"[yellow]{len(result.skipped)} step(s) skipped for a non-finite loss or gradient norm "
                          f"(steps {', '.join(map(str, result.skipped[:10]))})[/]")
    if run.before is not None:
        before, after = run.before, run.exact_match("after")
        metrics.update({"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
                        "contains_match_after": after["contains_match"]})
        for label, res in (("before training", before), ("after training", after)):
            run.logger.log({"step": run.total_steps, "label": label, "samples": res["samples"]})
        if main:
            console.print(f"[bold]held-out exact match: before {100 * before['exact_match']:.1f}% → "
                          f"after {100 * after['exact_match']:.1f}%[/] ({after['n']} examples)")
    run.logger.log({"step": run.total_steps, "final": True, **{k: v for k, v in metrics.items() if v is not None}})
    if (sources := run.feed.finish()) and main:  # a stream's report: what it read and trained
        run.logger.log({"step": run.total_steps, "data_sources": sources})
        (out_dir / "data_report.json").write_text(dumps(run.data.report.to_dict(), indent=2))
        run.data.report.render(console, title="Training data (streamed)")
    run.logger.close()
    if main:
        (out_dir / "final_metrics.json").write_text(dumps(metrics, indent=2))
        report = build_report(out_dir)
        console.print(f"saved to [bold]{escape(str(out_dir))}[/] (report: {escape(str(report))})")
    return TrainResult(str(out_dir), run.total_steps, result.last_loss, metrics)


def train(cfg: Config, *, model=None, tokenizer=None, source=None, fmt=None, sinks=()) -> TrainResult:
    """Fine-tune as configured: :func:`setup`, :func:`loop`, :func:`finish`. Returns where the model
    went and the final metrics.

    ``model``, ``tokenizer`` (both already loaded), ``source`` (a :class:`~sftune.data.sources.Source`
    of rows) and ``fmt`` (a custom :class:`~sftune.data.formats.Format`) replace what the config
    would load; the Python front-ends (``sftune.SFTTrainer``) pass them, and ``sinks`` (receivers
    of every metrics record, see :class:`~sftune.console.MetricsLogger`). The output directory is
    checked and locked first: one run per output directory.
    """
    main = is_main_process()
    if main:
        check_output_dir(Path(cfg.train.output_dir))
    with RunLock(cfg.train.output_dir, enabled=main), saves_finished():  # checkpoints in place before the lock goes
        run = setup(cfg, model=model, tokenizer=tokenizer, source=source, fmt=fmt, sinks=sinks)
        with run.cluster.handling():  # SIGTERM = Ctrl-C, then exit status 75 (requeue me)
            result = loop(run)
            if result.interrupted:
                out = TrainResult(str(run.out_dir), result.step, result.last_loss, interrupted=True,
                                  preempted=result.preempted)
            else:
                out = finish(run, result)
        end_distributed(run)  # barrier, free the DDP model, destroy the process group: a clean exit
        return out
