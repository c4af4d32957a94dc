"""The one ``SFTTrainer`` (``sftune.compat.trainer``): the Trainer surface TRL 1.x scripts touch:
``train()`` -> ``TrainOutput``, ``evaluate()``, ``state.log_history``, callbacks, ``save_model``,
``push_to_hub`` offline, and ``report_to`` (TensorBoard event files, W&B offline)."""

import importlib.util
import json
import math

import pytest
from datasets import Dataset
from test_compat_trl1 import rows, script
from transformers import TrainerCallback

from sftune import SFTConfig, SFTTrainer
from sftune.errors import SftuneError


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", state.global_step, dict(logs)))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.append(("evaluate", state.global_step, dict(metrics)))

    def on_save(self, args, state, control, **kw):
        self.events.append(("save", state.global_step, None))


def test_trainer_surface_eval_callbacks_tensorboard(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = Recorder()
    ds = Dataset.from_list(rows("text") * 2)
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                     eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, bf16=False,
                     learning_rate=1e-3, report_to=["tensorboard"])
    trainer = SFTTrainer(str(tiny_model_dir), args=args, train_dataset=ds, eval_dataset=ds.select(range(4)),
                         callbacks=[rec])
    assert trainer.processing_class is trainer.tokenizer and trainer.model is not None
    out = trainer.train()
    assert out.global_step == 4
    kinds = [e[0] for e in rec.events]
    assert kinds.count("evaluate") == 2 and kinds.count("save") == 2  # steps 2 and 4
    assert [r["step"] for r in trainer.state.log_history if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in trainer.state.log_history)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and rec.events[-1][0] == "evaluate"
    trainer.save_model(str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "config.json").exists()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    with pytest.raises(SftuneError, match="push_to_hub.*failed.*saved in"):
        trainer.push_to_hub()


def test_wandb_offline_writes_a_run_dir(tiny_model_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install 'sftune[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                     bf16=False, report_to=["wandb"])
    SFTTrainer(str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows("text"))).train()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_record_shapes_are_json(tiny_model_dir, tmp_path):
    trainer, out = script("sftune", tiny_model_dir, tmp_path, "text", {}, {})
    json.dumps(trainer.state.log_history)
    assert out.metrics["train_loss"] == out.training_loss
