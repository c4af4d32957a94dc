"""FSDP2, DeepSpeed ZeRO and multi-node, executed on CPU ranks (gloo): each equals one process.

FSDP runs go through accelerate's FSDP2 plugin, configured by ``configs/accelerate/fsdp.yaml``
(turned into the environment ``accelerate launch`` exports) and launched by torchrun with
``tests/cpu_engines.py``, which lets accelerate select FSDP on CPU (see its docstring: a test-only
switch). Everything else is the code a GPU run executes: ``fsdp2_prepare_model``, sharded
(DCP) checkpoints, the full state dict gathered on rank 0, sftune's sharded eval and
``synced_gpus`` generation.

DeepSpeed (``deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``) runs the same way when it is
installed (``pip install 'sftune[deepspeed]'``; not in the default environment).

The multi-node test is two torchrun launches (``--nnodes 2 --node_rank 0|1``) meeting on
127.0.0.1: the shape of a real multi-node launch, with loopback standing in for the network.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from sftune.config import load_config
from sftune.training import train

from conftest import build_model_dir, write_jsonl

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve().parent / "cpu_engines.py"
ROWS = [{"instruction": "word " * (1 + (i * 7) % 23), "output": "answer " * (1 + (i * 5) % 11)} for i in range(37)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("fdata") / "qa.jsonl", ROWS)


def overrides(model_dir, data_file, out, **over):
    base = {"model.path": str(model_dir), "data.path": str(data_file), "data.template": "qa",
            "data.max_length": 64, "data.limit": None, "train.output_dir": str(out), "train.log_every": 1,
            "train.lr": 1e-3, "train.max_steps": 4, "train.warmup_steps": 0, "train.grad_accum": 2,
            "train.batch_size": 2}
    base.update(over)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_env(config: Path = ROOT / "configs" / "accelerate" / "fsdp.yaml") -> dict:
    """The environment ``accelerate launch --config_file fsdp.yaml`` gives each process
    (``accelerate.utils.launch.prepare_multi_gpu_env``): ``fsdp_x: v`` becomes ``FSDP_X=v``."""
    fsdp = yaml.safe_load(config.read_text())["fsdp_config"]
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_SYNC_MODULE_STATES": "true"}
    for key, value in fsdp.items():
        env["FSDP_" + key.removeprefix("fsdp_").upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def deepspeed_env(stage: int) -> dict:
    """The environment ``accelerate launch --config_file deepspeed_zero{stage}.yaml`` gives each
    process (``accelerate.utils.launch.prepare_deepspeed_cmd_env``)."""
    ds = yaml.safe_load((ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml").read_text())["deepspeed_config"]
    names = {"zero_stage": "ZERO_STAGE", "offload_optimizer_device": "OFFLOAD_OPTIMIZER_DEVICE",
             "offload_param_device": "OFFLOAD_PARAM_DEVICE", "zero3_init_flag": "ZERO3_INIT",
             "zero3_save_16bit_model": "ZERO3_SAVE_16BIT_MODEL"}
    env = {"ACCELERATE_USE_DEEPSPEED": "true"}
    for key, value in ds.items():
        env["ACCELERATE_DEEPSPEED_" + names[key]] = str(value).lower()
    return env


def base_env(**extra) -> dict:
    # gloo on the loopback interface only; one thread per rank (2 cores shared)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "GLOO_SOCKET_IFNAME": "lo", **extra}


def launch(over: dict, *, engine: dict | None = None, nproc: int = 2, torchrun_args=(), wait: bool = True):
    """torchrun ``sftune train``: through the harness with ``engine`` (default: FSDP2 from
    fsdp.yaml), or plain ``-m sftune`` (DDP) with ``engine={}``."""
    engine = fsdp_env() if engine is None else engine
    target = [str(HARNESS)] if engine else ["-m", "sftune"]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *torchrun_args,
            *target, "train", "codealpaca", *(f"{k}={'null' if v is None else v}" for k, v in over.items())]
    if not torchrun_args:
        args[5:5] = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    # output goes to files, not pipes: with two launches at once (two "nodes"), a pipe nobody reads
    # yet could fill up and block one node while the test waits on the other
    logs = (tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+"))
    proc = subprocess.Popen(args, stdout=logs[0], stderr=logs[1], text=True, env=base_env(**engine))
    proc.logs = logs
    return finish(proc) if wait else proc


def _read(f) -> str:
    f.seek(0)
    text = f.read()
    f.close()
    return text


def finish(proc) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        _read(proc.logs[0])
        pytest.fail("torchrun timed out (a rank waiting for a collective the others never joined?)\n"
                    + _read(proc.logs[1])[-3000:])
    out, err = _read(proc.logs[0]), _read(proc.logs[1])
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_fsdp(proc, line="distributed_type=FSDP over gloo, fsdp_version=2"):
    assert "cpu_engines: " + line in proc.stderr, proc.stderr[-2000:]


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {m["step"]: m["loss"] for m in records(out) if "loss" in m}


def weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_losses_equal(one, two, rel=1e-5):
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) and a
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst < rel, (a, b)
    return worst


@pytest.mark.parametrize("packing", [False, True])
def test_fsdp_full_shard_equals_one_process(tiny_model_dir, data_file, tmp_path, packing):
    """FSDP2 full shard, full fine-tune, 2 ranks x batch 2 == 1 process x batch 4: the loss of every
    step, and the final model, gathered on rank 0 into a plain Hugging Face directory."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(overrides(tiny_model_dir, data_file, two, **{"data.packing": packing}), wait=False)
    train(load_config("codealpaca", overrides(tiny_model_dir, data_file, one,
                                              **{"data.packing": packing, "train.batch_size": 4})))
    assert_fsdp(finish(proc))
    print("max relative loss difference", assert_losses_equal(one, two))
    # one normal HF directory, loadable by plain transformers, no shards or FSDP files next to it
    assert (two / "model.safetensors").exists() and not list(two.glob("*fsdp*")) and not (two / "checkpoints").exists()
    w1, w2 = weights(one), weights(two)
    assert w2["lm_head.weight"].data_ptr() == w2["transformer.wte.weight"].data_ptr()  # still tied
    diff = max_diff(w1, w2)
    print("max weight difference", diff)
    assert diff < 1e-5


@pytest.mark.parametrize("packing,merge", [(False, True), (True, False)])
def test_fsdp_lora_with_eval_and_generation(tiny_model_dir, data_file, tmp_path, packing, merge):
    """LoRA under FSDP2 (frozen base sharded, adapters trained), with eval loss and sample
    generation every 2 steps and exact match before/after: every rank takes part in every forward
    (a rank left out would leave the others waiting in a collective: the launch would time out).
    Losses, eval metrics, generations and the saved adapter (or merged model) equal one process."""
    extra = {"data.packing": packing, "lora.enabled": True, "lora.dropout": 0.0, "lora.merge": merge,
             "data.eval_split": 0.2, "train.eval_every": 2, "eval.samples": 2, "eval.max_new_tokens": 6,
             "eval.exact_match": True, "eval.limit": 3, "train.lr": 1e-2}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(overrides(tiny_model_dir, data_file, two, **extra), wait=False)
    train(load_config("codealpaca", overrides(tiny_model_dir, data_file, one, **extra, **{"train.batch_size": 4})))
    assert_fsdp(finish(proc))
    print("max relative loss difference", assert_losses_equal(one, two))
    ev1, ev2 = ([m for m in records(o) if "eval_loss" in m and "final" not in m] for o in (one, two))
    assert [m["step"] for m in ev1] == [m["step"] for m in ev2] == [2, 4]
    for a, b in zip(ev1, ev2):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5) and b["eval_tokens"] == a["eval_tokens"]
    gen1, gen2 = ([m for m in records(o) if "samples" in m] for o in (one, two))
    assert len(gen2) == len(gen1) == 4  # 2 evaluations + exact match before and after
    assert [(m["label"], m["samples"]) for m in gen1] == [(m["label"], m["samples"]) for m in gen2]
    final1, final2 = (json.loads((o / "final_metrics.json").read_text()) for o in (one, two))
    assert final2["exact_match_after"] == final1["exact_match_after"]
    if merge:
        assert not (two / "adapter_config.json").exists()
        diff = max_diff(weights(one), weights(two))
    else:
        from peft import AutoPeftModelForCausalLM
        from safetensors.torch import load_file

        a1, a2 = (load_file(str(o / "adapter_model.safetensors")) for o in (one, two))
        assert a1 and sorted(a1) == sorted(a2)
        diff = max_diff(a1, a2)
        AutoPeftModelForCausalLM.from_pretrained(str(two))  # loads in plain peft + transformers
    print("max weight difference", diff)
    assert diff < 1e-5


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("fdmodel"), tiny_tokenizer, resid_pdrop=0.1, attn_pdrop=0.1)


def test_fsdp_sharded_checkpoint_resumes(dropout_model_dir, data_file, tmp_path):
    """A sharded (DCP) checkpoint at step 3, resumed under 2 ranks, continues exactly as the
    uninterrupted run: losses (dropout on: RNG states restored per rank) and final weights."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    over = {"train.max_steps": 5, "train.save_every": 3, "train.keep_checkpoints": 5}
    assert_fsdp(launch(overrides(dropout_model_dir, data_file, full, **over)))
    ckpt = full / "checkpoints" / "step-0000003"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard per rank, not a full state dict
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from sftune.digests import check_dir, files_under

    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]  # every rank's shards have a digest
    assert sorted(manifest) == files_under(ckpt) and "pytorch_model_fsdp_0/__1_0.distcp" in manifest
    assert check_dir(ckpt).status == "intact"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, cut / "checkpoints" / ckpt.name)
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l).get("step", 99) <= 3) + "\n")
    proc = launch(overrides(dropout_model_dir, data_file, cut, **over, **{"train.resume": "true"}))
    assert_fsdp(proc)
    assert "resumed from" in proc.stderr
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    diff = max_diff(weights(full), weights(cut))
    print("max weight difference after resume", diff)
    assert diff < 1e-6


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_on_loopback(tiny_model_dir, data_file, tmp_path, rendezvous):
    """Two torchrun launches, one per "node" (--nnodes 2, 1 process each), meeting at a rendezvous
    on 127.0.0.1, gloo on the loopback interface: the run equals one process with the whole batch,
    as 2 local ranks do (tests/test_distributed.py). ``static``: ``--node_rank 0|1 --master_addr
    --master_port`` (what ``accelerate launch --config_file multinode.yaml`` does); ``c10d``:
    ``--rdzv_backend c10d --rdzv_endpoint`` (the README's torchrun line; node ranks are assigned
    by the rendezvous)."""
    one, two = tmp_path / "one", tmp_path / "two"
    port = free_port()
    if rendezvous == "static":
        common = ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    else:
        common = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "sftune-test"]
    over = overrides(tiny_model_dir, data_file, two)
    nodes = [launch(over, engine={}, nproc=1, wait=False,
                    torchrun_args=["--nnodes", "2", "--node_rank", str(r), "--local_addr", "127.0.0.1", *common])
             for r in (0, 1)]
    train(load_config("codealpaca", overrides(tiny_model_dir, data_file, one, **{"train.batch_size": 4})))
    node0, node1 = (finish(p) for p in nodes)
    printed = [n.stderr.count("Training data") for n in (node0, node1)]
    assert sorted(printed) == [0, 1]  # only global rank 0 prints
    if rendezvous == "static":
        assert printed == [1, 0]  # and it lives on node 0
    print("max relative loss difference", assert_losses_equal(one, two))
    diff = max_diff(weights(one), weights(two))
    print("max weight difference", diff)
    assert diff < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install 'sftune[deepspeed]'); with it, ZeRO-2/3 run "
                           "here on CPU ranks (its first launch JIT-compiles a C++ comm op, minutes)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process(tiny_model_dir, data_file, tmp_path, stage):
    """DeepSpeed ZeRO-2/3 (the shipped configs, zero.Init and the 16-bit gather for ZeRO-3) equals
    one process; ZeRO-3 also evaluates and generates samples with every rank taking part."""
    extra = {"data.eval_split": 0.2, "train.eval_every": 2, "eval.samples": 2, "eval.max_new_tokens": 6}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(overrides(tiny_model_dir, data_file, two, **extra), engine=deepspeed_env(stage), wait=False)
    train(load_config("codealpaca", overrides(tiny_model_dir, data_file, one, **extra, **{"train.batch_size": 4})))
    assert_fsdp(finish(proc), f"distributed_type=DEEPSPEED over gloo, zero_stage={stage}")
    print("max relative loss difference", assert_losses_equal(one, two))
    gen1, gen2 = ([m["samples"] for m in records(o) if "samples" in m] for o in (one, two))
    assert gen1 == gen2 and len(gen1) == 2
    diff = max_diff(weights(one), weights(two))
    print("max weight difference", diff)
    assert diff < 1e-5
