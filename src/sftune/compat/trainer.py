"""The one ``SFTTrainer``: TRL 0.7 and TRL 1.x calls, and the Trainer surface scripts touch.

The arguments decide the front: an :class:`~sftune.compat.SFTConfig` (or no ``args`` and no
0.7-era keywords) is a TRL 1.x call (:func:`sftune.compat.trl1.build`); a plain
``transformers.TrainingArguments`` or 0.7 keywords (``tokenizer``, ``max_seq_length``,
``dataset_text_field``, ``packing``, ...) is a TRL 0.7 call (:func:`sftune.compat.trl07.build`).
Either becomes one :class:`~sftune.config.Config`; ``train()`` calls :func:`sftune.training.train`
once.

The Trainer surface: ``train()`` returns ``transformers.TrainOutput`` for a 1.x call (sftune's
``TrainResult`` for a 0.7 call, as before), ``evaluate()``, ``state.log_history`` in Trainer's
record shapes, ``TrainerCallback``s' ``on_log`` / ``on_evaluate`` / ``on_save`` (fed by a
:class:`~sftune.console.MetricsLogger` sink, :class:`History`), ``save_model()`` and
``push_to_hub()``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from sftune.compat.trl07 import RUN_FILES, as_dataset
from sftune.compat.trl07 import build as build_trl07
from sftune.compat.trl1 import UNSUPPORTED_ARGS, SFTConfig, dataset_type, prompt_completion_messages
from sftune.compat.trl1 import build as build_trl1
from sftune.console import is_main_process
from sftune.errors import ConfigError, SftuneError

TRL1_KEYWORDS = set(UNSUPPORTED_ARGS)  # TRL 1.x's SFTTrainer arguments beyond the named ones


class History:
    """A metrics sink: sftune's records -> Trainer's ``log_history`` records, and the callbacks."""

    def __init__(self, trainer: "SFTTrainer"):
        self.trainer = trainer
        self.last_step = 0
        self.loss_sum = 0.0  # sum over logged windows of loss x steps: Trainer's mean training loss

    def log(self, record: dict) -> None:
        t = self.trainer
        step = int(record.get("step", 0))
        epoch = round(step / max(t.steps_per_epoch, 1), 4)
        t.state.global_step, t.state.epoch = step, epoch
        if record.get("event") == "save":
            if t.callbacks:  # a callback may read the checkpoint: in place first (digests hashed, renamed)
                from sftune.checkpoint import wait_for_saves

                wait_for_saves()
            t.callback("on_save")
        elif "loss" in record and "lr" in record:
            self.loss_sum += record["loss"] * (step - self.last_step)
            self.last_step = step
            logs = {"loss": record["loss"]}
            if "grad_norm" in record:
                logs["grad_norm"] = record["grad_norm"]
            logs.update({"learning_rate": record["lr"], "num_tokens": float(t.tokens_seen(record)), "epoch": epoch})
            t.emit(logs)
        elif "eval_loss" in record and not record.get("final"):
            metrics = {"eval_loss": record["eval_loss"], "eval_ppl": record["eval_ppl"]}
            t.emit({**metrics, "epoch": epoch})
            t.callback("on_evaluate", metrics=metrics)

    def close(self) -> None:
        pass


class SFTTrainer:
    """TRL's ``SFTTrainer`` by name and arguments (0.7 and 1.x), trained by sftune's pipeline and loop.

    After construction: ``config`` (the :class:`~sftune.config.Config`), ``args``, ``source`` (the
    rows), ``format`` (the custom format, or ``None`` for a config-built one), ``model``,
    ``processing_class`` (also ``tokenizer``) and ``state`` (``transformers.TrainerState``).
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), *, peft_config=None, formatting_func=None, **kwargs):
        # TRL 1.x takes everything else in SFTConfig: other keywords (or a TrainingArguments) are a 0.7 call
        legacy = not isinstance(args, SFTConfig) and (args is not None or bool(set(kwargs) - TRL1_KEYWORDS))
        if legacy:
            self.api = "TRL 0.7"
            extra = {k: v for k, v in (("compute_metrics", compute_metrics), ("callbacks", callbacks),
                                       ("optimizers", optimizers)) if v not in (None, (None, None))}
            if compute_loss_func is not None:
                raise ConfigError("compute_loss_func is a TRL 1.x argument: pass args=sftune.SFTConfig(...)")
            built = build_trl07(model, args, data_collator, train_dataset, eval_dataset, peft_config=peft_config,
                                formatting_func=formatting_func, processing_class=processing_class,
                                **extra, **kwargs)
            args = args if args is not None else TrainingArguments(output_dir="tmp_trainer")
            callbacks = []
        else:
            self.api = "TRL 1.x"
            if args is None:  # TRL's default: an SFTConfig named after the model
                name = model if isinstance(model, str) else getattr(model, "name_or_path", "") or "model"
                args = SFTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SFT")
            built = build_trl1(model, args, data_collator, train_dataset, eval_dataset, processing_class,
                               peft_config=peft_config, formatting_func=formatting_func,
                               compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                               optimizers=optimizers, **kwargs)
        self.args, self.built = args, built
        self.config = built.config
        self.model, self.tokenizer = built.model, built.tokenizer
        self.train_dataset, self.eval_dataset = built.train_dataset, built.eval_dataset
        self.format, self.source = built.fmt, built.source
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
        self.state, self.control = TrainerState(), TrainerControl()
        self.steps_per_epoch = 1
        self.result = None
        self._tokens = 0
        if is_main_process():
            built.guidance.print(self.config.train.output_dir)

    @property
    def processing_class(self):
        return self.tokenizer

    # -- the Trainer surface

    def callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self.args, self.state, self.control, model=self.model,
                               processing_class=self.tokenizer, **kwargs)

    def emit(self, logs: dict) -> None:
        """One record of ``state.log_history`` (``step`` added, as Trainer does), and ``on_log``."""
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.callback("on_log", logs=logs)

    def tokens_seen(self, record: dict) -> int:
        self._tokens += int(record.get("loss_tokens", 0))
        return self._tokens

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def train(self, resume_from_checkpoint: bool | str | None = None, **kwargs):
        """Train once with :func:`sftune.training.train`. A TRL 1.x call returns ``TrainOutput(global_step,
        training_loss, metrics)``; a 0.7 call sftune's ``TrainResult``. ``resume_from_checkpoint=True``
        continues from the newest checkpoint in output_dir."""
        from sftune.training import train

        if kwargs:
            raise TypeError(f"train() got unexpected keyword arguments {sorted(kwargs)}")
        if isinstance(resume_from_checkpoint, (str, Path)):
            raise ConfigError("sftune resumes from the newest checkpoint in args.output_dir; "
                              "pass resume_from_checkpoint=True")
        if resume_from_checkpoint:
            self.config.train.resume = True
        self.steps_per_epoch = max(1, self._steps_per_epoch())
        history = History(self)
        self.state.max_steps = self.config.train.max_steps or 0
        self.callback("on_train_begin")
        start = time.perf_counter()
        self.result = train(self.config, model=self.model, tokenizer=self.tokenizer, source=self.source,
                            fmt=self.format, sinks=[history] if self.api == "TRL 1.x" else [])
        runtime = time.perf_counter() - start
        self.callback("on_train_end")
        if self.api == "TRL 0.7":
            return self.result
        steps = self.result.steps
        if self.result.interrupted:  # Ctrl-C or SIGTERM: a checkpoint, no final model to report or push
            self.state.global_step = steps
            return TrainOutput(steps, float("nan"), {"interrupted": True, "preempted": self.result.preempted})
        rows = len(self.train_dataset) * max(self.args.num_train_epochs, steps / self.steps_per_epoch)
        train_loss = history.loss_sum / max(history.last_step, 1) if history.last_step else float("nan")
        metrics = {"train_runtime": round(runtime, 4), "train_samples_per_second": round(rows / runtime, 3),
                   "train_steps_per_second": round(steps / runtime, 3), "train_loss": train_loss,
                   "epoch": round(steps / self.steps_per_epoch, 4)}
        self.state.global_step = steps
        self.emit(metrics)
        if self.args.push_to_hub:
            self.push_to_hub()
        return TrainOutput(steps, train_loss, metrics)

    def _steps_per_epoch(self) -> int:
        n = len(self.train_dataset)
        per_step = self.config.train.batch_size * self.config.train.grad_accum
        return -(-n // per_step)  # an estimate before packing (packing changes the unit count)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Loss and perplexity on the eval set with the model as it is now (Trainer's ``evaluate``)."""
        from sftune.data.chain import prepare
        from sftune.data.sources import Source, with_row_index
        from sftune.eval_metrics import eval_loss
        from sftune.loss import CausalLMWithLoss
        from sftune.model import resolve_max_length

        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise SftuneError("evaluate() needs an eval set: pass eval_dataset= to SFTTrainer or to evaluate()")
        ds = as_dataset(ds, "eval_dataset")
        if eval_dataset is not None and self.api == "TRL 1.x" and self.config.data.format == "messages" and \
                dataset_type(ds, self.args.dataset_text_field) == "conversational_prompt_completion":
            ds = prompt_completion_messages(ds)
        start = time.perf_counter()
        cfg = self.config
        source = Source(train=with_row_index(ds), eval=None, name="eval_dataset", rows_read=len(ds))
        max_length = resolve_max_length(cfg, self.tokenizer, self.model.config)
        data = prepare(cfg.data.model_copy(update={"eval_split": None, "sources": None, "streaming": False}),
                       self.tokenizer, max_length,
                       source=source, fmt=self.format, seed=cfg.train.seed)
        device = next(self.model.parameters()).device
        m = eval_loss(CausalLMWithLoss(self.model), data.train, batch_size=cfg.train.batch_size,
                      max_length=max_length, pad_id=self.tokenizer.pad_token_id, device=device,
                      packing=cfg.data.packing)
        runtime = time.perf_counter() - start
        metrics = {f"{metric_key_prefix}_loss": m["eval_loss"], f"{metric_key_prefix}_ppl": m["eval_ppl"],
                   f"{metric_key_prefix}_runtime": round(runtime, 4),
                   f"{metric_key_prefix}_samples_per_second": round(len(ds) / runtime, 3),
                   f"{metric_key_prefix}_steps_per_second": round(-(-len(ds) // cfg.train.batch_size) / runtime, 3)}
        if self.state.epoch is not None:
            metrics["epoch"] = self.state.epoch
        self.emit(metrics)
        self.callback("on_evaluate", metrics=metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trained model as a standard Hugging Face directory (default: ``args.output_dir``,
        where ``.train()`` already saved it): weights or adapter, config, tokenizer, generation
        config and ``sftune_config.yaml``."""
        if self.result is None:
            raise SftuneError("nothing to save yet: call trainer.train() first (it saves the final model to "
                              "args.output_dir)")
        if self.result.interrupted:
            raise SftuneError(f"training was interrupted, so no final model was saved; resume with "
                              f"trainer.train(resume_from_checkpoint=True) (checkpoints in {self.result.output_dir})")
        src = Path(self.result.output_dir)
        dst = Path(output_dir) if output_dir else src
        if dst.resolve() == src.resolve():
            return
        dst.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            if p.is_file() and p.name not in RUN_FILES and p.suffix != ".png":
                shutil.copy2(p, dst / p.name)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs) -> str:
        """Upload ``output_dir`` (the saved model) to ``args.hub_model_id`` (default: the folder's name)."""
        from huggingface_hub import HfApi

        folder = Path(self.result.output_dir if self.result else self.args.output_dir)
        if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
            raise SftuneError(f"push_to_hub: {folder} holds no saved model yet; call trainer.train() first")
        repo = getattr(self.args, "hub_model_id", None) or folder.name
        try:
            api = HfApi(token=getattr(self.args, "hub_token", None))
            api.create_repo(repo, private=getattr(self.args, "hub_private_repo", None), exist_ok=True)
            return str(api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=commit_message))
        except Exception as e:  # offline, no token, no permission: say so, the model stays on disk
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SftuneError(f"push_to_hub to {repo!r} failed: {type(e).__name__}: {first}. The trained model "
                              f"is saved in {folder}; upload it later with `hf upload {repo} {folder}` (after "
                              "`hf auth login`) when online") from None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Trainer's ``log``: a record added to ``state.log_history`` (and given to the callbacks)."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": self.state.epoch}
        self.emit(logs)
