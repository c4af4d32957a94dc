"""Speed and memory options (sftune.speedups) that can be checked on a CPU: bucketed row widths change no result, the optional
extras refuse clearly, ``gradient_checkpointing=auto`` is unchanged on CPU, peak memory reaches
the report. (Their GPU effects are measured by bench/gpu.py.)"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sftune import speedups
from sftune.config import Config
from sftune.data.packing import bucket_width, collate
from sftune.errors import ConfigError
from sftune.loss import CausalLMWithLoss
from test_model_families import build, examples


def test_bucket_width():
    assert [bucket_width(w, 128) for w in (1, 128, 129, 300)] == [128, 128, 256, 384]
    assert bucket_width(77, 0) == 77 and bucket_width(77, 1) == 77


@pytest.mark.parametrize("layout", ["flat", "rows", "per_example"])
def test_bucket_padding_changes_no_result(layout):
    """Padding a micro-batch to a multiple of 64 gives the same loss and gradients in every layout."""
    from sftune.attention import disable_varlen, enable_varlen

    model = build("mistral")  # windowed: the padding segment must not shift any window
    (enable_varlen if layout == "flat" else disable_varlen)(model)
    exs = examples()
    rows = [[e] for e in exs] if layout == "per_example" else [list(exs)]
    results = []
    for bucket in (0, 64):
        b = collate(rows, pad_id=0, bucket=bucket)
        assert b.input_ids.shape[1] == (bucket_width(72, bucket) if layout != "per_example" else
                                           bucket_width(30, bucket))
        bounds = b.doc_bounds if layout == "flat" else None
        if bounds and bucket:
            assert bounds[-1] == b.input_ids.shape[1] and bounds[-2] == 72
        lm = CausalLMWithLoss(model, layout=layout)
        model.zero_grad()
        if bucket:  # the loss slots are bucketed too, the extra ones weighing 0
            assert b.loss_index.numel() % bucket == 0 and float(b.loss_weights.sum()) == b.n_loss
        loss = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, bounds, b.loss_weights)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], b.real_tokens, b.n_loss))
    (l0, g0, r0, n0), (l1, g1, r1, n1) = results
    assert (r0, n0) == (r1, n1)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-5)
    for a, b in zip(g0, g1):  # fp32 rounding of differently shaped matmuls, relative to the gradient's scale
        assert float((b - a).abs().max()) <= 2e-5 * max(float(a.abs().max()), 1e-3)


def test_bucket_auto_follows_compile():
    assert speedups.bucket_for(Config()) == 0
    assert speedups.bucket_for(Config.model_validate({"train": {"compile": True}})) == 128
    assert speedups.bucket_for(Config.model_validate({"train": {"compile": True, "bucket": 64}})) == 64


def test_adamw_8bit_refuses_clearly_on_cpu():
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ConfigError, match="adamw_8bit"):
        speedups.adamw_8bit(params, {"lr": 1e-3}, torch.device("cpu"))


def test_liger_refuses_clearly(monkeypatch):
    model = build("llama")
    assert speedups.apply_kernels("none", model) is model
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ConfigError, match="pip install"):
            speedups.apply_kernels("liger", model, "cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(ConfigError, match="CUDA"):
        speedups.apply_kernels("liger", model, "cpu")


def test_checkpointing_auto_unchanged_on_cpu(monkeypatch):
    """On CPU the estimate is the fp32 one it always was (the old formula, inline)."""
    from transformers import LlamaConfig

    mc = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8)
    old = 4 * (8 * 2048 * 512 * 34 + 8 * 8 * 2048 * 2048 * 5) * 2
    assert speedups.activation_bytes(mc, 8 * 2048, 8, 2048, torch.device("cpu")) == old
    cfg = Config.model_validate({"train": {"batch_size": 8}})
    monkeypatch.setattr("sftune.speedups.available_bytes", lambda d: int(old / 0.6) + 1)
    assert not speedups.needs_checkpointing(cfg, mc, 2048, "cpu")
    monkeypatch.setattr("sftune.speedups.available_bytes", lambda d: int(old / 0.6) - 1000)
    assert speedups.needs_checkpointing(cfg, mc, 2048, "cpu")
    # on a GPU in bf16 with fused attention kernels the same batch needs far less
    assert speedups.activation_bytes(mc, 8 * 2048, 8, 2048, torch.device("cuda"), "bf16", True) < old / 4


def test_peak_memory_reaches_the_report(tmp_path):
    from sftune.run_report import build_report

    assert speedups.device_metrics("cpu") == {}
    recs = [{"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 10.0, "peak_mem_gib": 3.5},
            {"step": 2, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 10.0, "peak_mem_gib": 4.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = build_report(tmp_path).read_text()
    assert "peak GPU memory | 4.25 GiB" in text or "peak GPU memory" in text and "4.25 GiB" in text
