"""Faults during a run: NaN, Ctrl-C mid-step, damaged checkpoints, a full disk, two runs, file-system
errors, settings that leave nothing to learn. Each asserts the exit code, that no traceback is
printed, and what the message names."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftune.cli import main
from sftune.config import load_config
from sftune.training import train

from conftest import build_model_dir, write_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = pytest.mark.usefixtures("no_plots")  # conftest: the report's plots are not what these tests check


def args_for(model_dir, data_file, out, **over):
    base = {"model.path": str(model_dir), "data.path": str(data_file), "data.template": "qa",
            "data.max_length": 64, "train.output_dir": str(out), "train.log_every": 1, "train.lr": 1e-3,
            "train.batch_size": 4, "train.max_steps": 4}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def cfg_for(model_dir, data_file, out, **over):
    return load_config(None, args_for(model_dir, data_file, out, **over))


def run_cli(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which are not JSON)."""
    def bad(name):
        raise ValueError(f"invalid JSON literal {name}")
    return json.loads(text, parse_constant=bad)


def all_json_valid(out: Path) -> None:
    for f in out.rglob("*.json"):
        strict_json(f.read_text())
    for f in out.rglob("*.jsonl"):
        for line in f.read_text().splitlines():
            strict_json(line)


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def losses(out) -> dict:
    return {m["step"]: m["loss"] for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


# ----------------------------------------------------------------------------- Ctrl-C mid-step


RESUME = {"train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": 6, "train.scheduler": "cosine",
          "train.warmup_steps": 2, "train.max_grad_norm": 1.0}


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, qa_rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(cfg_for(dropout_model_dir, qa_rows_file, out, **RESUME))
    return losses(out), final_weights(out)


@pytest.mark.parametrize("where", ["forward-1", "forward-2", "backward", "optimizer"])
def test_ctrl_c_mid_step_resume_is_bit_exact(where, dropout_model_dir, qa_rows_file, uninterrupted, tmp_path,
                                             monkeypatch):
    """A real SIGINT during step 4 (inside its first or second micro-batch forward, inside a backward, or
    inside the optimizer update) saves the state of a step boundary; resume reproduces the
    uninterrupted run bit for bit: every logged loss and every weight."""
    from sftune.loss import CausalLMWithLoss

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    calls = {"n": 0}
    target = {"forward-1": 7, "forward-2": 8, "backward": 8, "optimizer": 4}[where]  # step index 3 (the 4th)

    def interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the KeyboardInterrupt arrives at the next Python bytecode

    forward = CausalLMWithLoss.forward

    def forward_with_signal(self, *a, **kw):
        if not torch.is_grad_enabled():  # the start-up probe's forwards are not training steps
            return forward(self, *a, **kw)
        calls["n"] += 1
        if where.startswith("forward") and calls["n"] == target:
            out = forward(self, *a, **kw)  # dropout has drawn its randomness: then the signal
            interrupt()
            return out
        out = forward(self, *a, **kw)
        if where == "backward" and calls["n"] == target:
            out.register_hook(lambda g: interrupt())
        return out

    step = torch.optim.AdamW.step

    def step_with_signal(self, *a, **kw):
        calls.setdefault("steps", 0)
        calls["steps"] += 1
        if where == "optimizer" and calls["steps"] == target:
            interrupt()  # deferred until the step is done: the checkpoint is at step 4
        return step(self, *a, **kw)

    try:
        monkeypatch.setattr(CausalLMWithLoss, "forward", forward_with_signal)
        monkeypatch.setattr(torch.optim.AdamW, "step", step_with_signal)
        cut = tmp_path / "cut"
        result = train(cfg_for(dropout_model_dir, qa_rows_file, cut, **RESUME))
        monkeypatch.undo()
    finally:
        signal.signal(signal.SIGINT, previous)
    expected_step = 4 if where == "optimizer" else 3
    assert result.interrupted and result.steps == expected_step
    assert (cut / "checkpoints" / f"step-{expected_step:07d}" / "trainer_state.json").exists()
    assert not (cut / "model.safetensors").exists()
    train(cfg_for(dropout_model_dir, qa_rows_file, cut, **RESUME, **{"train.resume": True}))
    ref_losses, ref_weights = uninterrupted
    got = losses(cut)
    assert sorted(got) == list(range(1, 7))
    assert got == ref_losses  # exact float equality, every step
    w = final_weights(cut)
    assert all(torch.equal(w[k], ref_weights[k]) for k in ref_weights)


# ----------------------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    path = build_model_dir(tmp_path_factory.mktemp("nan_model"), tiny_tokenizer)
    sd = load_file(str(path / "model.safetensors"))
    key = next(k for k in sd if k.endswith("ln_f.weight"))
    sd[key][3] = float("nan")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_nan_weight_stops_the_run(nan_model_dir, qa_rows_file, tmp_path, capsys):
    out = tmp_path / "nan"
    code, _, err = run_cli(["train", "codealpaca", *args_for(nan_model_dir, qa_rows_file, out)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "step 1: the loss is nan" in err and "no final model was written" in err
    assert "train.on_nonfinite=skip" in err
    assert not (out / "model.safetensors").exists() and not (out / "final_metrics.json").exists()
    all_json_valid(out)
    assert not (out / ".sftune.lock").exists()  # the lock goes with the run


def _nan_at(monkeypatch, bad_calls: set[int]):
    """The loss of the given training forward calls (1-based) becomes NaN."""
    from sftune.loss import CausalLMWithLoss

    forward, calls = CausalLMWithLoss.forward, {"n": 0}

    def nan_forward(self, *a, **kw):
        if not torch.is_grad_enabled():  # the start-up probe's forwards are not training steps
            return forward(self, *a, **kw)
        calls["n"] += 1
        out = forward(self, *a, **kw)
        return out * float("nan") if calls["n"] in bad_calls else out

    monkeypatch.setattr(CausalLMWithLoss, "forward", nan_forward)


def test_nan_mid_run_keeps_last_good_checkpoint(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {4})
    out = tmp_path / "mid"
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        "train.save_every": 2, "train.max_steps": 6})], capsys)
    assert code == 2 and "Traceback" not in err
    assert "step 4: the loss is nan" in err and "step-0000002" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (out / "model.safetensors").exists()
    all_json_valid(out)


def test_on_nonfinite_skip_counts_and_bounds(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2, 3})
    out = tmp_path / "skip"
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        "train.on_nonfinite": "skip", "train.max_skipped_steps": 2, "train.max_steps": 5})], capsys)
    assert code == 0, err
    assert "2 step(s) skipped" in err and "steps 2, 3" in err
    final = strict_json((out / "final_metrics.json").read_text())
    assert final["skipped_steps"] == 2 and math.isfinite(final["train_loss"])
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())
    all_json_valid(out)
    logged = losses(out)
    assert 2 not in logged and 3 not in logged and all(math.isfinite(v) for v in logged.values())

    monkeypatch.undo()
    _nan_at(monkeypatch, {2, 3, 4})  # three bad steps, two allowed: stops at step 4
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, tmp_path / "over", **{
        "train.on_nonfinite": "skip", "train.max_skipped_steps": 2, "train.max_steps": 5})], capsys)
    assert code == 2 and "Traceback" not in err and "train.max_skipped_steps=2" in err and "step 4" in err


def test_huge_lr_stops_with_a_message(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    """lr=1e6: the weights blow up within a step or two; exit status 2, one message naming the step and
    the value, no final model, valid JSON only. (In-process: the two-process lock test covers
    ``python -m sftune``'s own error path.)"""
    out = tmp_path / "lr"
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        "train.lr": 1e6, "train.max_steps": 6})], capsys)
    assert code == 2 and "Traceback" not in err
    assert "the run stopped" in err and "step " in err and "nan" in err.lower()
    assert not (out / "model.safetensors").exists() and not (out / "final_metrics.json").exists()
    all_json_valid(out)


# ----------------------------------------------------------------------------- checkpoints and disk


def flip_middle(path: Path, n: int = 4096) -> None:
    """Bit rot: invert ``n`` bytes in the middle of a file; its size and header stay as they were."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_set_aside_and_the_previous_one_taken(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    """4 KiB flipped in the middle of the newest checkpoint's weights (size and header intact: it still
    loads): resume names the file, sets the checkpoint aside as step-N.corrupt (kept, no longer listed
    or rotated) and resumes from the previous one, in one line. All damaged: a clear error."""
    out = tmp_path / "dmg"
    over = {"train.save_every": 2, "train.max_steps": 4, "train.keep_checkpoints": 3}
    train(cfg_for(tiny_model_dir, qa_rows_file, out, **over))
    newest = out / "checkpoints" / "step-0000004" / "model.safetensors"
    flip_middle(newest)
    capsys.readouterr()
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        **over, "train.resume": True, "train.max_steps": 5})], capsys)
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "damaged checkpoint" in line)
    assert "step-0000004" in warning and "model.safetensors" in warning and "resuming from step-0000002" in warning
    assert "at step 2" in " ".join(err.split())
    assert (out / "checkpoints" / "step-0000004.corrupt" / "model.safetensors").exists()  # kept, not deleted
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [  # keep 3: .corrupt is not counted
        "step-0000002", "step-0000004", "step-0000004.corrupt", "step-0000005"]

    for ck in ("step-0000002", "step-0000004", "step-0000005"):  # now every checkpoint is damaged
        flip_middle(out / "checkpoints" / ck / "optimizer.bin")
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        **over, "train.resume": True, "train.max_steps": 6})], capsys)
    assert code == 2 and "Traceback" not in err and "no intact checkpoint in" in err and "optimizer.bin" in err
    assert "train.resume=false" in err


def test_checkpoint_without_digests_is_taken_with_a_note(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    """A checkpoint written before sftune recorded digests resumes, with a note; a truncated file in one
    is still found by loading it."""
    out = tmp_path / "legacy"
    over = {"train.save_every": 2, "train.max_steps": 4, "train.keep_checkpoints": 3}
    train(cfg_for(tiny_model_dir, qa_rows_file, out, **over))
    for ck in (out / "checkpoints").iterdir():
        (ck / "manifest.json").unlink()
    newest = out / "checkpoints" / "step-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    capsys.readouterr()
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        **over, "train.resume": True, "train.max_steps": 5})], capsys)
    assert code == 0, err
    assert "has no digests" in err and "step-0000004 is damaged" in err and str(newest) in err
    assert "resumed from" in err and "step-0000002" in err


def test_damaged_final_model_is_named_by_generate_and_export_verify(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    """The final save records its files' digests (sftune_manifest.json); 4 KiB flipped in the weights is
    named by generate and export --verify (and an exported copy damaged later by export --verify)."""
    out = tmp_path / "final"
    train(cfg_for(tiny_model_dir, qa_rows_file, out, **{"train.max_steps": 2}))
    code, _, err = run_cli(["export", str(out), "--out", str(tmp_path / "exp"), "--verify"], capsys)
    assert code == 0 and "verify: PASS" in err
    flip_middle(tmp_path / "exp" / "model.safetensors")  # the exported copy, damaged after export
    from sftune.export.verify import verify_export

    res = verify_export(str(out), tmp_path / "exp")
    assert not res.ok and "do not match what was written: model.safetensors" in res.lines[0]
    flip_middle(out / "model.safetensors")
    for args in (["generate", str(out), "--prompt", "hi"], ["export", str(out), "--out", str(tmp_path / "e2"),
                                                           "--verify"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and "Traceback" not in err, err
        said = " ".join(err.split())
        assert f"the model files in {out} do not match what was written: model.safetensors" in said
        assert f"sftune verify {out}" in said


@pytest.mark.parametrize("kind", ["oserror", "torch"])
def test_disk_full_while_saving_a_checkpoint(kind, tiny_model_dir, qa_rows_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    save = torch.save

    def failing_save(obj, f, *a, **kw):
        if "step-0000004" in str(f):  # the second checkpoint hits a full disk
            if kind == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        "train.save_every": 2, "train.max_steps": 6})], capsys)
    assert code == 2 and "Traceback" not in err
    assert "no space left on device" in err and str(out / "checkpoints") in err
    assert "step-0000002" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # no .tmp left behind


# ----------------------------------------------------------------------------- one run per output directory


def test_second_run_refuses_while_the_first_holds_the_lock(tiny_model_dir, qa_rows_file, tmp_path):
    """Two processes: one holds the output directory; `sftune train` into it refuses, naming the PID."""
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from sftune.runlock import RunLock, check_output_dir; from pathlib import Path;"
        f"check_output_dir(Path({str(out)!r})); lock = RunLock({str(out)!r}).acquire(); print('held', flush=True);"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run([sys.executable, "-m", "sftune", "train", "codealpaca",
                               *args_for(tiny_model_dir, qa_rows_file, out)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"process {holder.pid}" in proc.stderr and "one run per output directory" in proc.stderr
    assert not (out / "metrics.jsonl").exists()


def test_stale_lock_is_taken_over_and_old_log_moved_aside(tiny_model_dir, qa_rows_file, tmp_path, capsys):
    out = tmp_path / "stale"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / ".sftune.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (out / "checkpoints" / "step-0000100").mkdir(parents=True)  # an earlier run's (newer-numbered) checkpoint
    (out / "checkpoints" / "step-0000100" / "trainer_state.json").write_text('{"step": 100}')
    code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out, **{
        "train.max_steps": 1, "train.save_every": 1})], capsys)
    assert code == 0, err
    assert f"stale lock" in err and str(dead.pid) in err
    assert "metrics.jsonl, checkpoints" in err and "moved to previous-1/" in err
    assert (out / "previous-1" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 9.0}\n'  # kept, not deleted
    assert (out / "previous-1" / "checkpoints" / "step-0000100" / "trainer_state.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    assert not (out / ".sftune.lock").exists()


# ----------------------------------------------------------------------------- file system


def test_file_system_errors_are_one_clear_line(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, says in [(a_file, "is a file, not a directory"), (a_file / "sub", "is a file")]:
        code, _, err = run_cli(["train", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, out)], capsys)
        assert code == 2 and "Traceback" not in err and str(a_file) in err and says in err, err
        assert len(err.strip().splitlines()) == 1

    # an export target that exists as a file
    code, _, err = run_cli(["export", str(tiny_model_dir), "--out", str(a_file)], capsys)
    assert code == 2 and "Traceback" not in err and str(a_file) in err and "is a file" in err

    # an unreadable data file (tests may run as root, so the refusal is simulated)
    real_open = Path.open

    def deny(self, *a, **kw):
        if self == qa_rows_file:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *a, **kw)

    monkeypatch.setattr(Path, "open", deny)
    code, _, err = run_cli(["preview", "codealpaca", *args_for(tiny_model_dir, qa_rows_file, tmp_path / "p")], capsys)
    assert code == 2 and "Traceback" not in err and str(qa_rows_file) in err and "permission denied" in err


def test_max_length_that_leaves_nothing_to_learn(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 30, "output": "yes"}] * 5)
    code, _, err = run_cli(["preview", "codealpaca", *args_for(tiny_model_dir, data, tmp_path / "o", **{
        "data.max_length": 8})], capsys)
    assert code == 2 and "Traceback" not in err
    assert "data.max_length=8 leaves no trained token" in err and "5 of 5" in err and "data.max_length >= " in err


def test_generate_on_a_run_without_final_model(tmp_path, capsys):
    """A run stopped by Ctrl-C or a NaN has checkpoints but no final model: say so, and how to finish."""
    run = tmp_path / "stopped"
    (run / "checkpoints" / "step-0000003").mkdir(parents=True)
    (run / "sftune_config.yaml").write_text("train:\n  output_dir: x\n")
    code, _, err = run_cli(["generate", str(run), "--prompt", "hi"], capsys)
    assert code == 2 and "Traceback" not in err and "has no final model" in err and "step-0000003" in err
    code, _, err = run_cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "Traceback" not in err and "does not exist" in err
