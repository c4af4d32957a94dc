"""The training loop: forward, loss, backward, step. Read it top to bottom.

Loss normalisation, in plain sight: the loss of an optimizer step is the sum of the token losses
of all its micro-batches on all ranks, divided by the number of loss tokens in the whole step.
Each micro-batch's backward therefore uses ``loss_sum * world_size / step_tokens``: the token
count is all-reduced once per step, and ``world_size`` undoes DDP's gradient averaging. So
``1 x 8``, ``4 x 2`` and ``2 ranks x 4`` produce the same gradients (tested).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from rich.markup import escape

from sftune.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from sftune.config import SFTConfig, config_to_yaml
from sftune.data.packing import BatchPlan, model_inputs
from sftune.data.pipeline import PreparedData, describe_plan, prepare_data
from sftune.errors import ConfigError
from sftune.evaluate import eval_loss, generation_eval, sample_generations
from sftune.export import save_final
from sftune.levers import adamw_8bit, apply_kernels, bucket_for, device_metrics, needs_checkpointing
from sftune.loss import CausalLMWithLoss
from sftune.probe import choose_layout
from sftune.model import (count_parameters, fast_activations, load_model, load_model_config, load_tokenizer,
                          resolve_max_length, unwrap_causal_lm)
from sftune.report import build_report
from sftune.ui import MetricsLogger, console, quiet_third_party, training_progress, truncate_metrics



@dataclass
class TrainResult:
    output_dir: str
    steps: int
    train_loss: float | None
    metrics: dict = field(default_factory=dict)
    interrupted: bool = False


# ----------------------------------------------------------------------------- setup helpers


def make_accelerator(cfg: SFTConfig):
    """The accelerate state: devices, mixed precision, and the engine chosen at launch (DDP, FSDP,
    DeepSpeed). Refuses set-ups that cannot work, with the fix."""
    import importlib.util

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

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
    return Accelerator(mixed_precision=mp, cpu=multi_cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)], **extra)


def is_sharded(accelerator) -> bool:
    """FSDP or ZeRO-3: every rank must take part in every forward (generation included)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: never on biases, norm weights or other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or ".ln_" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: SFTConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (CUDA, and CPU since torch 2.4:
    several times faster than foreach and without its temporaries), else foreach."""
    kw = dict(lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), eps=cfg.train.adam_eps)
    groups = param_groups(model, cfg.train.weight_decay)
    if cfg.train.optimizer == "adamw_8bit":  # sftune.levers: bitsandbytes, CUDA only
        return adamw_8bit(groups, kw, device)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def make_scheduler(cfg: SFTConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.train.warmup_steps or int(math.ceil(cfg.train.warmup_ratio * total_steps))
    name = {"constant": "constant_with_warmup"}.get(cfg.train.scheduler, cfg.train.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def activation_bytes(model_config, tokens: int, rows: int, seq: int) -> int:
    """Rough activation memory of one micro-batch without checkpointing (fp32)."""
    d = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", 768)
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", 12)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", 12)
    return int(layers * (tokens * d * 34 + rows * heads * seq * seq * 5) * 2)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def want_checkpointing(cfg: SFTConfig, model_config, max_length: int, device: torch.device, model=None) -> bool:
    if cfg.model.gradient_checkpointing != "auto":
        return bool(cfg.model.gradient_checkpointing)
    return needs_checkpointing(cfg, model_config, max_length, device, model)  # sftune.levers


class Batches:
    """This rank's micro-batches for optimizer step ``step`` (deterministic: resume-safe)."""

    def __init__(self, plan: BatchPlan, data, pad_id: int, rank: int, world: int):
        self.plan, self.data, self.pad_id, self.rank, self.world = plan, data, pad_id, rank, world
        self._epoch, self._steps = -1, []

    def __call__(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._steps = epoch, self.plan.epoch_steps(epoch)
        micro = self.plan.micro_batches(self._steps[index], self.rank, self.world)
        return [self.plan.batch(units, self.data, self.pad_id) for units in micro]


# ----------------------------------------------------------------------------- train


def train(cfg: SFTConfig, *, model=None, tokenizer=None, source=None, fmt=None) -> TrainResult:
    """Fine-tune as configured; returns where the model went and the final metrics.

    ``model``, ``tokenizer`` (both already loaded), ``source`` (a :class:`~sftune.data.sources.Source`
    of rows) and ``fmt`` (a custom :class:`~sftune.data.formats.Format`) replace what the config
    would load; the Python front-ends (``sftune.SFTTrainer``) pass them.
    """
    from accelerate.utils import set_seed

    quiet_third_party()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    accelerator = make_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    out_dir = Path(cfg.train.output_dir)
    if cfg.train.resume and not list_checkpoints(out_dir):
        raise ConfigError(f"train.resume=true but {out_dir}/checkpoints holds no checkpoint to resume from")
    set_seed(cfg.train.seed)

    # ---- data: rows -> segments -> ids + labels -> a batch plan
    n_added = 0
    if tokenizer is None:
        tokenizer, n_added = load_tokenizer(cfg)
    model_config = model.config if model is not None else load_model_config(cfg)
    max_length = resolve_max_length(cfg, tokenizer, model_config)
    with accelerator.main_process_first():
        data: PreparedData = prepare_data(cfg.data, tokenizer, max_length, source=source, fmt=fmt)

    # ---- model, loss, optimizer, schedule
    if model is None:
        model = load_model(cfg, tokenizer, n_added, device)
    elif cfg.lora.enabled and not hasattr(model, "peft_config"):
        from sftune.model import add_lora

        model = add_lora(cfg, model)
    fast_activations(model)
    model = apply_kernels(cfg.model.kernels, model, device)  # model.kernels (sftune.levers)
    # the row layout and loss the model can take, checked on a few of this run's examples: chosen once
    choice = choose_layout(cfg, model, data, data.report, console if main else None, device, is_sharded(accelerator))
    plan = BatchPlan.build(data.train.lengths, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                           world_size=world, packing=cfg.data.packing, max_length=max_length, seed=cfg.train.seed,
                           layout=choice.layout, hidden_size=getattr(model_config, "hidden_size", 768),
                           bucket=bucket_for(cfg))
    describe_plan(data.report, plan)
    if main:
        data.report.render(console, title="Training data")
        if cfg.train.eval_every and data.eval is None:
            console.print(f"note: train.eval_every={cfg.train.eval_every} is ignored: the data has no eval split "
                          "(set data.eval_split, e.g. data.eval_split=0.05)")
    if want_checkpointing(cfg, model_config, max_length, device, model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if main:
            console.print("gradient checkpointing: on")
    trainable, total = count_parameters(model)
    if main:
        console.print(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    lm = CausalLMWithLoss(model, fused=choice.fused, layout=choice.layout)
    if cfg.train.compile:
        lm.compile(dynamic=True)
    optimizer = make_optimizer(cfg, lm, device)
    steps_per_epoch = plan.steps_per_epoch
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    lm, optimizer = accelerator.prepare(lm, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    batches = Batches(plan, data.train, tokenizer.pad_token_id, rank, world)

    # Generation runs on rank 0; sharded models (FSDP, ZeRO-3) need every rank in every forward.
    sharded = is_sharded(accelerator)
    generates = main or sharded
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def generation(kind: str, label: str = ""):
        model = accelerator.unwrap_model(lm).model
        if kind == "samples":
            return sample_generations(cfg, model, tokenizer, data, synced=sharded)
        return generation_eval(cfg, model, tokenizer, data, label=label, show=main, synced=sharded)

    # ---- optional: exact match before training (the quickstart's "before")
    before = None
    if generates and cfg.eval.exact_match and data.source.eval is not None and not cfg.train.resume:
        before = generation("exact_match", "before")

    # ---- resume
    start_step = 0
    if cfg.train.resume:
        state = load_checkpoint(accelerator, out_dir)
        start_step = state["step"]
        if main:
            console.print(f"resumed from {state['path']} at step {start_step}", markup=False)
            if truncate_metrics(out_dir, start_step):  # steps after the checkpoint were abandoned
                console.print(f"metrics.jsonl: dropped the records after step {start_step}")
    elif main and (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run starts a fresh log
    logger = MetricsLogger(out_dir, cfg.train.report_to, main, cfg.model_dump(mode="json"))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sftune_config.yaml").write_text(config_to_yaml(cfg))
        (out_dir / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=2))

    def save(step: int) -> None:
        save_checkpoint(accelerator, out_dir, step, {"world_size": world, "epoch": step / steps_per_epoch,
                                                      "total_steps": total_steps}, cfg.train.keep_checkpoints)

    def evaluate(step: int) -> dict:
        """Eval loss / perplexity, and a few fixed sample prompts generated, logged with the metrics."""
        if data.eval is None:
            return {}
        m = eval_loss(lm, data.eval, batch_size=cfg.train.batch_size, max_length=max_length,
                      pad_id=tokenizer.pad_token_id, device=device, packing=cfg.data.packing,
                      accelerator=accelerator)
        logger.log({"step": step, **m})
        if main:
            console.print(f"step {step}: eval loss {m['eval_loss']:.4f}, perplexity {m['eval_ppl']:.2f}")
        if generates and cfg.eval.samples:
            samples = generation("samples")
            logger.log({"step": step, "label": f"step {step}", "samples": samples})
            if main:
                for smp in samples[:2]:
                    console.print(f"  [dim]{escape(repr(smp['prompt'][-60:]))}[/] → {escape(repr(smp['generated'][:80]))}")
        return m

    # ---- the loop
    lm.train()
    window_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed token loss since last log
    window_tokens = 0  # loss tokens since last log (this rank)
    window_real = 0  # non-padding tokens since last log (this rank)
    window_start = time.perf_counter()
    last_loss, step = None, start_step
    progress = training_progress(main)
    try:
        with progress:
            task = progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-", tps="-")
            for step in range(start_step, total_steps):
                micro_batches = batches(step)
                # the normaliser: the step's loss tokens over all micro-batches and ranks (their summed
                # weights, when messages carry weights; a plain count otherwise)
                step_tokens = torch.tensor(sum(mb["w_loss"] for mb in micro_batches), dtype=torch.float64,
                                           device=device)
                if world > 1:
                    step_tokens = accelerator.reduce(step_tokens, reduction="sum")
                normaliser = step_tokens.clamp(min=1e-12).to(torch.float32) / world
                if deepspeed:  # DeepSpeed divides each backward by grad_accum itself: undo that
                    normaliser = normaliser / cfg.train.grad_accum
                for i, mb in enumerate(micro_batches):
                    inputs = model_inputs(mb, device)
                    sync = i == len(micro_batches) - 1
                    if deepspeed:  # DeepSpeed reduces and steps inside backward at the step boundary
                        accelerator.gradient_state._set_sync_gradients(sync)
                    with contextlib.nullcontext() if sync or deepspeed else accelerator.no_sync(lm):
                        with accelerator.autocast():
                            loss_sum = lm(**inputs)  # forward: summed token loss of this micro-batch
                        accelerator.backward(loss_sum / normaliser)  # backward: its share of the step's mean
                    window_loss += loss_sum.detach().double()
                    window_tokens += mb["w_loss"]
                    window_real += mb["real_tokens"]
                grad_norm = None
                if cfg.train.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(lm.parameters(), cfg.train.max_grad_norm)
                optimizer.step()  # step
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1

                if done % cfg.train.log_every == 0 or done == total_steps:
                    stats = torch.stack([window_loss, window_loss.new_tensor(window_tokens),
                                         window_loss.new_tensor(window_real)])
                    if world > 1:
                        stats = accelerator.reduce(stats, reduction="sum")
                    elapsed = time.perf_counter() - window_start
                    last_loss = (stats[0] / stats[1].clamp(min=1e-12)).item()
                    tps = stats[2].item() / max(elapsed, 1e-9)
                    lr = scheduler.get_last_lr()[0]
                    record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": last_loss, "lr": lr,
                              "tokens_per_s": round(tps, 1), "loss_tokens": int(stats[1].item())}
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm)
                    record.update(device_metrics(device))  # peak GPU memory on CUDA (sftune.levers)
                    logger.log(record)
                    progress.update(task, loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                    window_loss.zero_()
                    window_tokens = window_real = 0
                    window_start = time.perf_counter()
                progress.update(task, completed=done)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total_steps:
                    evaluate(done)
                if cfg.train.save_every and done % cfg.train.save_every == 0 and done != total_steps:
                    save(done)
            step = total_steps
    except KeyboardInterrupt:
        if main:
            console.print(f"\n[yellow]interrupted: saving a checkpoint at step {step}[/]")
        save(step)
        logger.close()
        return TrainResult(str(out_dir), step, last_loss, interrupted=True)

    # ---- end: evaluate, save the model, report
    eval_metrics = evaluate(total_steps)
    if cfg.train.save_every:
        save(total_steps)
    save_final(cfg, accelerator, lm, tokenizer, out_dir, data)
    metrics = {"train_loss": last_loss, **eval_metrics}
    if before is not None:
        after = generation("exact_match", "after")
        metrics.update({"exact_match_before": before["exact_match"], "exact_match_after": after["exact_match"],
                        "contains_match_after": after["contains_match"]})
        for label, res in (("before training", before), ("after training", after)):
            logger.log({"step": total_steps, "label": label, "samples": res["samples"]})
        if main:
            console.print(f"[bold]held-out exact match: before {100 * before['exact_match']:.1f}% → "
                          f"after {100 * after['exact_match']:.1f}%[/] ({after['n']} examples)")
    logger.log({"step": total_steps, "final": True, **{k: v for k, v in metrics.items() if v is not None}})
    logger.close()
    if main:
        (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
        report = build_report(out_dir)
        console.print(f"saved to [bold]{escape(str(out_dir))}[/] (report: {escape(str(report))})")
    accelerator.end_training()
    return TrainResult(str(out_dir), total_steps, last_loss, metrics)
