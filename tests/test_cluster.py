"""Long runs on a cluster (``sftune.cluster``): SIGTERM saves and exits 75, resume=auto, time-based
checkpoints, and a torchrun group that loses a rank (SIGKILL) or its launcher (SIGTERM) and, run
again or restarted, ends with exactly the uninterrupted run's losses and weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftune.cli import main
from sftune.cluster import REQUEUE_EXIT, config_differences, peer_lost, rendezvous_kwargs, resolve_resume
from sftune.config import config_to_yaml, load_config
from sftune.training import train

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("no_plots")  # conftest: the report's plots are not what these tests check


def over(model_dir, data_file, out, **extra):
    base = {"model.path": str(model_dir), "data.path": str(data_file), "data.template": "qa",
            "data.max_length": 64, "train.output_dir": str(out), "train.log_every": 1, "train.lr": 1e-3,
            "train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": 6, "train.warmup_steps": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out) -> dict:
    return {m["step"]: m["loss"] for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, qa_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(load_config("codealpaca", over(dropout_model_dir, qa_rows_file, out)))
    return losses(out), final_weights(out)


def sigterm_at_forward(monkeypatch, n: int) -> None:
    """SIGTERM to this process inside the n-th training forward (after dropout drew its randomness)."""
    from sftune.loss import CausalLMWithLoss

    forward, calls = CausalLMWithLoss.forward, {"n": 0}

    def forward_with_signal(self, *a, **kw):
        out = forward(self, *a, **kw)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
        return out

    monkeypatch.setattr(CausalLMWithLoss, "forward", forward_with_signal)


@pytest.mark.parametrize("grace, saved_at", [(0, 3), (600, 4)])
def test_sigterm_saves_exits_75_and_auto_resume_is_bit_exact(grace, saved_at, dropout_model_dir, qa_rows_file,
                                                             uninterrupted, tmp_path, monkeypatch, capsys):
    """SIGTERM in step 4: with no grace the partial step is undone (checkpoint at step 3); with time
    to spare the step is finished (step 4). Exit 75; the same command with train.resume=auto ends
    bit for bit as the uninterrupted run."""
    out = tmp_path / "run"
    args = ["train", "codealpaca", *over(dropout_model_dir, qa_rows_file, out, **{"train.preempt_grace_seconds": grace,
                                                                "train.resume": "auto"})]
    sigterm_at_forward(monkeypatch, 7)  # step 4's first micro-batch (2 per step)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    code = main(args)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed after the run
    err = capsys.readouterr().err
    assert code == REQUEUE_EXIT, err[-2000:]
    assert f"preempted: saving a checkpoint at step {saved_at}" in err and "exit status 75" in err
    assert "starting fresh" in err and "Traceback" not in err
    assert (out / "checkpoints" / f"step-{saved_at:07d}").is_dir() and not (out / "model.safetensors").exists()

    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming from the newest checkpoint, step-{saved_at:07d}" in err
    ref_losses, ref_weights = uninterrupted
    assert losses(out) == ref_losses  # exact, every step
    w = final_weights(out)
    assert all(torch.equal(w[k], ref_weights[k]) for k in ref_weights)


def test_save_every_minutes_and_checkpoint_age(tiny_model_dir, qa_rows_file, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, over(tiny_model_dir, qa_rows_file, out, **{"train.save_every_minutes": 1e-6,
                                                                 "train.keep_checkpoints": 10,
                                                                 "train.max_steps": 3})))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ages = [r["checkpoint_age_s"] for r in records if "loss" in r]
    assert len(ages) == 3 and all(0 <= a < 60 for a in ages)


def test_resume_auto_decisions(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = load_config(None, over(tiny_model_dir, qa_rows_file, out, **{"train.resume": "auto"}))
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_resume(cfg, out, 1, True) is False
    assert "train.resume=auto: starting fresh" in capsys.readouterr().err
    ck = out / "checkpoints" / "step-0000003"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2}))
    (out / "sftune_config.yaml").write_text(config_to_yaml(cfg))
    assert resolve_resume(cfg, out, 2, False) is True
    assert resolve_resume(cfg, out, 1, False) is False  # another world size
    # keys that do not change what is trained may differ; others may not
    same = load_config(None, over(tiny_model_dir, qa_rows_file, out, **{"train.resume": "auto", "train.save_every": 9,
                                                                   "train.num_threads": 1}))
    assert resolve_resume(same, out, 2, False) is True
    other = load_config(None, over(tiny_model_dir, qa_rows_file, out, **{"train.resume": "auto", "train.lr": 2e-3}))
    assert config_differences(other, out / "sftune_config.yaml") == ["train.lr: 0.001 -> 0.002"]
    assert resolve_resume(other, out, 2, False) is False
    # unset: auto only on a restart
    unset = load_config(None, over(tiny_model_dir, qa_rows_file, out))
    assert unset.train.resume is None and resolve_resume(unset, out, 2, False) is False
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resolve_resume(unset, out, 2, True) is True
    assert "a restart (TORCHELASTIC_RESTART_COUNT=1), so train.resume=auto: resuming" in capsys.readouterr().err
    (out / "final_metrics.json").write_text("{}")
    assert resolve_resume(unset, out, 2, False) is False  # a complete run is not continued


def test_each_torchrun_attempt_has_its_own_store_namespace(monkeypatch):
    """torchrun's static rendezvous keeps one store across restarts: attempt N's keys go under
    sftune/attempt-N/, so a restarted rank never reads the dead attempt's gloo addresses."""
    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(master.port), "TORCHELASTIC_RESTART_COUNT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    master.set("default_pg/0//rank_0", "the dead attempt's address")
    [kwargs] = rendezvous_kwargs()
    url = kwargs.to_kwargs()["init_method"]
    store, rank, world = next(dist.rendezvous(url))
    assert (rank, world) == (1, 2)
    store.set("k", "v")
    assert master.check(["sftune/attempt-1/k"]) and master.get("sftune/attempt-1/k") == b"v"
    assert not store.check(["default_pg/0//rank_0"])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert rendezvous_kwargs() == []


def test_a_lost_peer_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    e = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43692. This is "
                     "typically caused by a remote worker crashing.")
    assert peer_lost(e).startswith("rank 0: another rank of this run is gone (")
    assert "--max-restarts" in peer_lost(e)
    assert peer_lost(RuntimeError("shape mismatch")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert peer_lost(e) is None


# ----------------------------------------------------------------------------- torchrun: a lost rank, a preempted launcher


def torchrun(overrides: list[str], env: dict, out: Path, restarts: int = 0) -> subprocess.Popen:
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", str(restarts),
            "--master_port", str(29000 + (os.getpid() + restarts * 7 + len(env) * 13) % 1000),
            str(TESTS / "elastic_entry.py"), "train", "codealpaca", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    log = open(out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log", "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


ELASTIC = {"train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 7, "train.save_every": 3,
           "train.keep_checkpoints": 3, "data.max_length": 64, "data.limit": "null"}


@pytest.fixture(scope="module")
def two_rank_reference(dropout_model_dir, qa_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "full"
    proc = torchrun(over(dropout_model_dir, qa_rows_file, out, **ELASTIC), {}, out)
    assert proc.wait(timeout=300) == 0, read_logs(out)
    return losses(out), final_weights(out)


def read_logs(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.parent.glob(out.name + "-*.log")))[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_rank_killed_torchrun_restarts_and_resumes_exactly(dropout_model_dir, qa_rows_file, two_rank_reference, tmp_path):
    """Rank 0 is SIGKILLed while the step-6 checkpoint is being written (its files are on disk, the
    checkpoint is not complete; the lock it held is stale); torchrun --max-restarts=1 restarts the
    group, which resumes (train.resume unset: auto on a restart) from the step-3 checkpoint and ends
    with the uninterrupted 2-rank run's losses and weights."""
    out = tmp_path / "killed"
    proc = torchrun(over(dropout_model_dir, qa_rows_file, out, **ELASTIC),
                    {"SFTUNE_TEST_DIE_SAVING": "6", "SFTUNE_TEST_DIE_RANK": "0"}, out, restarts=1)
    assert proc.wait(timeout=300) == 0, read_logs(out)
    log = read_logs(out)
    assert "a restart (TORCHELASTIC_RESTART_COUNT=1), so train.resume=auto: resuming from the newest " \
           "checkpoint, step-0000003" in log, log
    assert "taking over the stale lock" in log
    ref_losses, ref_weights = two_rank_reference
    assert losses(out) == ref_losses
    w = final_weights(out)
    assert all(torch.equal(w[k], ref_weights[k]) for k in ref_weights)


@pytest.mark.slow
@pytest.mark.distributed
def test_launcher_sigterm_saves_and_the_same_command_resumes_exactly(dropout_model_dir, qa_rows_file,
                                                                     two_rank_reference, tmp_path):
    """SIGTERM to torchrun when step 5 begins: it forwards SIGTERM to both ranks, which agree on a
    step boundary, save there and exit 75; the same command (train.resume=auto) finishes exactly."""
    out = tmp_path / "preempted"
    args = over(dropout_model_dir, qa_rows_file, out, **ELASTIC, **{"train.resume": "auto"})
    proc = torchrun(args, {"SFTUNE_TEST_SIGTERM_STEP": "4"}, out)
    assert proc.wait(timeout=300) != 0
    log = read_logs(out)
    assert "preempted: saving a checkpoint at step" in log, log
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved[-1] >= "step-0000004", saved  # the boundary after SIGTERM, not the step-3 save
    proc = torchrun(args, {}, out)
    assert proc.wait(timeout=300) == 0, read_logs(out)
    assert f"resuming from the newest checkpoint, {saved[-1]}" in read_logs(out)
    ref_losses, ref_weights = two_rank_reference
    assert losses(out) == ref_losses
    w = final_weights(out)
    assert all(torch.equal(w[k], ref_weights[k]) for k in ref_weights)
