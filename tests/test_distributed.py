"""Several processes on CPU (gloo): DDP equals one process, resume under 2 ranks, clear errors.

These launch ``torchrun`` with 2 processes on a tiny model; each launch takes a few seconds.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sftune.config import load_config
from sftune.errors import ConfigError, SftuneError
from sftune.training import make_accelerator, train

from conftest import build_model_dir, write_jsonl

pytestmark = pytest.mark.distributed  # FSDP2 and two-node runs: tests/test_fsdp.py

ROWS = [{"instruction": "word " * (1 + (i * 7) % 23), "output": "answer " * (1 + (i * 5) % 11)} for i in range(37)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ddata") / "qa.jsonl", ROWS)


def overrides(model_dir, data_file, out, **over):
    base = {"model.path": str(model_dir), "data.path": str(data_file), "data.template": "qa",
            "data.max_length": 128, "data.limit": None, "train.output_dir": str(out), "train.log_every": 1,
            "train.lr": 1e-3, "train.max_steps": 4, "train.warmup_steps": 0}
    base.update(over)
    return base


def torchrun(over: dict, nproc: int = 2, script: Path | None = None) -> subprocess.CompletedProcess:
    """``sftune train codealpaca`` with the ``over`` overrides (or ``script``) on ``nproc`` CPU ranks."""
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29500 + os.getpid() % 1000)]
    args += [str(script)] if script else ["-m", "sftune", "train", "codealpaca", *(f"{k}={v}" for k, v in over.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out):
    return {m["step"]: m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


def weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()


def assert_same(a, b, tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("packing", [False, True])
def test_two_ranks_equal_one_process(tiny_model_dir, data_file, tmp_path, packing):
    """2 ranks x batch 2 x grad_accum 2 == 1 process x batch 4 x grad_accum 2: loss per step, weights."""
    one = tmp_path / "one"
    cfg = overrides(tiny_model_dir, data_file, one, **{"train.batch_size": 4, "train.grad_accum": 2,
                                                       "data.packing": packing, "data.max_length": 64})
    train(load_config("codealpaca", cfg))
    two = tmp_path / "two"
    proc = torchrun(overrides(tiny_model_dir, data_file, two, **{"train.batch_size": 2, "train.grad_accum": 2,
                                                                 "data.packing": packing, "data.max_length": 64}))
    assert proc.stderr.count("Training data") == 1  # only rank 0 prints
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert b[step]["loss_tokens"] == a[step]["loss_tokens"]  # all ranks' tokens are counted
    assert_same(weights(one), weights(two), 1e-5)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("dmodel"), tiny_tokenizer, resid_pdrop=0.1, attn_pdrop=0.1)


def test_resume_under_two_ranks(dropout_model_dir, data_file, tmp_path):
    full = tmp_path / "full"
    over = {"train.batch_size": 2, "train.grad_accum": 2, "train.max_steps": 6, "train.save_every": 3,
            "train.keep_checkpoints": 5}
    torchrun(overrides(dropout_model_dir, data_file, full, **over))
    # the state an interruption after step 3 leaves behind: the step-3 checkpoint and 3 logged steps
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000003", cut / "checkpoints" / "step-0000003")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l).get("step", 99) <= 3) + "\n")
    proc = torchrun(overrides(dropout_model_dir, data_file, cut, **over, **{"train.resume": "true"}))
    assert "resumed from" in proc.stderr
    a, b = losses(full), losses(cut)
    for step in range(1, 7):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step
    assert_same(weights(full), weights(cut), 1e-6)

    # the same checkpoint cannot resume in one process
    with pytest.raises(SftuneError, match="2 process"):
        train(load_config("codealpaca", {**overrides(dropout_model_dir, data_file, cut, **over), "train.resume": True}))


def test_deepspeed_config_without_deepspeed(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="pip install 'sftune\\[deepspeed\\]'"):
        make_accelerator(load_config("quickstart"))


def test_qlora_with_fsdp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="QLoRA"):
        make_accelerator(load_config("quickstart", ["lora.enabled=true", "lora.load_in_4bit=true"]))


def test_two_ranks_equal_one_process_with_message_weights(tiny_model_dir, tmp_path):
    """Per-message loss weights: the normaliser is the summed weight over ranks and micro-batches."""
    rows = [{"messages": [{"role": "user", "content": "word " * (1 + i % 5)},
                          {"role": "assistant", "content": "answer " * (1 + i % 4), "weight": 0.5 + (i % 3)}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    chat = {"data.chat_template": "chatml", "train.grad_accum": 2, "data.max_length": 64}
    one = tmp_path / "one"
    train(load_config("codealpaca", overrides(tiny_model_dir, data, one, **chat, **{"data.template": None,
                                                                                     "train.batch_size": 4})))
    two = tmp_path / "two"
    torchrun(overrides(tiny_model_dir, data, two, **chat, **{"data.template": "null", "train.batch_size": 2}))
    a, b = losses(one), losses(two)
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    assert_same(weights(one), weights(two), 1e-5)


def test_two_ranks_equal_one_process_with_images(vlm, tmp_path):
    """Image rows (Qwen2-VL, M-RoPE, packed): 2 ranks x batch 2 == 1 process x batch 4."""
    import vision_models

    data = vision_models.write_data(tmp_path / "vdata", n=8)
    over = {"data.template": None, "data.limit": None, "data.packing": True, "data.max_length": 256,
            "train.max_steps": 2}
    one = tmp_path / "one"
    train(load_config("codealpaca", overrides(vlm("qwen2_vl"), data, one, **over, **{"train.batch_size": 4})))
    two = tmp_path / "two"
    torchrun(overrides(vlm("qwen2_vl"), data, two, **{**over, "train.batch_size": 2, "data.template": "null"}))
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
    from transformers import AutoModelForImageTextToText

    assert_same(*(AutoModelForImageTextToText.from_pretrained(str(o), dtype=torch.float32).state_dict()
                  for o in (one, two)), 1e-5)


def test_the_model_goes_before_the_process_group(tiny_model_dir, data_file, tmp_path):
    """The end of a 2-rank run frees the DDP model while the process group is up, then destroys the
    group (``sftune.cluster.end_distributed``). When the group went first (accelerate's
    ``end_training``), the DDP reducer outlived it and its destructor, run when ``train`` returned,
    joined a gloo thread that waited for the GIL: an occasional hang after the run had finished."""
    script = tmp_path / "spy.py"
    script.write_text(
        "import sys, torch.distributed as dist, sftune.training as T\n"
        "from sftune.config import load_config\n"
        "seen, end = [], T.end_distributed\n"
        "def spy(run):\n"
        "    seen.append(dist.is_initialized())\n"
        "    end(run)\n"
        "    seen.append(dist.is_initialized())\n"
        "T.end_distributed = spy\n"
        f"T.train(load_config('codealpaca', {overrides(tiny_model_dir, data_file, tmp_path / 'out', **{'train.batch_size': 2, 'train.max_steps': 2})!r}))\n"
        "assert seen == [True, False], seen\n")
    torchrun({}, script=script)
