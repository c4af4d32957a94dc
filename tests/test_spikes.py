"""Loss spikes (``sftune.spikes``): the rule, and ``train.on_spike`` warn / skip / rollback on a run with an
injected bad batch: the spike is caught, skip and rollback train on to losses like a clean run's, and
rollback is deterministic."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sftune.spikes import SpikeGuard
from sftune.training import train

from conftest import train_config

pytestmark = pytest.mark.usefixtures("no_plots")

SPIKE_AT = 6  # the injected bad batch: the 6th optimizer step
RUN = {"train.max_steps": 10, "train.batch_size": 4, "train.save_every": 3, "train.spike_window": 3,
       "train.lr": 3e-3, "train.scheduler": "constant",  # still learning fast at the spike: damage shows
       "train.keep_checkpoints": 5}  # max_grad_norm 1e9 (conftest): norms measured, never clipped


def guard(**over):
    t = {"on_spike": "warn", "spike_window": 3, "spike_factor": 3.0, "spike_min_jump": 1.0,
         "spike_grad_factor": 10.0, "max_skipped_steps": 10, **over}
    return SpikeGuard(SimpleNamespace(**t), logger=SimpleNamespace(log=lambda r: None, path=Path("/nonexistent/m")))


def test_rule_warm_up_factor_floor_and_grad_norm():
    g = guard()
    assert g.rule(100.0, None) is None  # warm-up: nothing fires before N steps
    g.history = [(1, 2.0, 1.0), (2, 2.2, 1.1), (3, 1.8, 0.9)]
    assert g.rule(5.9, 1.0) is None  # under 3 x the median 2.0
    assert "loss 6.1 > 3 x median 2" in g.rule(6.1, 1.0)
    g.history = [(1, 0.01, 1.0)] * 3
    assert g.rule(0.5, 1.0) is None  # 50 x the median, but not 1.0 nat above it: the floor
    assert "gradient norm 11 > 10 x median 1" in g.rule(0.01, 11.0)
    assert guard(spike_window=0).rule(1e9, 1e9) is None  # 0 turns detection off


def test_window_survives_a_checkpoint():
    g = guard(on_spike="skip")
    g.history, g.skipped, g.drop, g.records = [(4, 2.0, None)], [3, 5], {6}, [{"step": 3}, {"step": 5}]
    h = guard()
    h.restore(json.loads(json.dumps({**g.state(), "step": 4})))
    assert h.history == [(4, 2.0, None)] and h.skipped == [3] and h.drop == {6} and h.records == [{"step": 3}]


def test_check_skip_limit_and_rollback_without_checkpoint(tmp_path):
    """``check`` on the numbers the NaN guard reduced: skip drops the update up to max_skipped_steps, then the
    run stops; rollback with no checkpoint to go back to skips instead, and says so."""
    from sftune.faults import TrainingDiverged

    logged = []

    def make(**over):
        g = guard(**over)
        g.logger = SimpleNamespace(log=logged.append, path=tmp_path / "metrics.jsonl")  # no checkpoints there
        g.history = [(1, 2.0, None)] * 3
        return g

    def stats(loss_sum):
        return torch.tensor([loss_sum], dtype=torch.float64)

    g = make(on_spike="skip", max_skipped_steps=1)
    assert g.check(4, stats(20.0), 10.0) is False  # mean loss 2.0: normal, enters the window
    assert g.check(5, stats(900.0), 10.0) is True and g.skipped == [5]
    with pytest.raises(TrainingDiverged, match="train.max_skipped_steps=1"):
        g.check(6, stats(900.0), 10.0)
    r = make(on_spike="rollback")
    assert r.check(7, stats(900.0), 10.0) is True and r.skipped == [7]
    assert logged[-1]["spike_action"] == "skip (no checkpoint to roll back to)" and logged[-1]["spike_loss"] == 90.0


def inject(monkeypatch, step: int = SPIKE_AT, factor: float = 1e3):
    """The test seam: the loss of the ``step``-th training forward (one micro-batch per step) is
    multiplied by ``factor``, as a batch of garbage tokens with a huge weight would make it; its gradient
    grows with it."""
    from sftune.loss import CausalLMWithLoss

    forward, calls = CausalLMWithLoss.forward, {"n": 0}

    def bad_forward(self, *a, **kw):
        if not torch.is_grad_enabled():  # the start-up probe and eval are not training steps
            return forward(self, *a, **kw)
        calls["n"] += 1
        out = forward(self, *a, **kw)
        return out * factor if calls["n"] == step else out

    monkeypatch.setattr(CausalLMWithLoss, "forward", bad_forward)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_loss(out: Path) -> float:
    return json.loads((out / "final_metrics.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def clean(tiny_model_dir, qa_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    train(train_config(tiny_model_dir, qa_rows_file, out, **RUN))
    assert not any("spike" in r for r in records(out))  # no false alarm on a clean run
    return out


def run_with_spike(mode, model_dir, data, out, monkeypatch):
    inject(monkeypatch)
    train(train_config(model_dir, data, out, **RUN, **{"train.on_spike": mode}))
    monkeypatch.undo()
    spikes = [r for r in records(out) if r.get("spike")]
    assert [r["step"] for r in spikes] == [SPIKE_AT] and spikes[0]["spike_loss"] > 100
    return spikes[0]


def test_warn_logs_and_counts_the_spike(tiny_model_dir, qa_rows_file, clean, tmp_path, monkeypatch, capsys):
    out = tmp_path / "warn"
    rec = run_with_spike("warn", tiny_model_dir, qa_rows_file, out, monkeypatch)
    err = capsys.readouterr().err
    assert f"step {SPIKE_AT}: loss spike: loss" in err and "train.on_spike=skip" in err
    assert rec["spike_action"] == "warn"
    assert json.loads((out / "final_metrics.json").read_text())["loss_spikes"] == 1
    assert SPIKE_AT in {r["step"] for r in records(out) if "loss" in r}  # trained on: logged as a step
    assert final_loss(out) > final_loss(clean) + 0.3  # the bad update did damage (measured: 4.75 vs 4.08)


def test_skip_drops_the_update(tiny_model_dir, qa_rows_file, clean, tmp_path, monkeypatch):
    out = tmp_path / "skip"
    run_with_spike("skip", tiny_model_dir, qa_rows_file, out, monkeypatch)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["loss_spikes"] == 1 and final["spike_steps_skipped"] == 1
    assert SPIKE_AT not in {r["step"] for r in records(out) if "loss" in r}
    assert math.isclose(final_loss(out), final_loss(clean), rel_tol=0.1)


def test_rollback_replays_without_the_spiking_batch_deterministically(tiny_model_dir, qa_rows_file, clean, tmp_path,
                                                                      monkeypatch, capsys):
    weights = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_with_spike("rollback", tiny_model_dir, qa_rows_file, out, monkeypatch)
        weights.append(load_file(str(out / "model.safetensors")))
    err = capsys.readouterr().err
    assert "rolled back to" in err and "step-0000003 (step 3)" in " ".join(err.split())
    assert f"the batch of step {SPIKE_AT} is skipped" in " ".join(err.split())
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == sorted(steps) and SPIKE_AT not in steps  # one run's log: the abandoned records dropped
    assert json.loads((out / "final_metrics.json").read_text())["spike_steps_skipped"] == 1
    assert math.isclose(final_loss(out), final_loss(clean), rel_tol=0.1)  # measured: 4.27 vs 4.08 (warn 4.75)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the same command twice
