"""Unit tests of sftune.export.hf: a LoRA run merged into plain weights gives the adapter model's
logits; the export dtype."""

import torch

from sftune.config import load_config
from sftune.export.hf import export_run
from sftune.training import train

from conftest import write_jsonl


def test_merged_export_logits_equal_adapter(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i} " * 3} for i in range(16)])
    run = tmp_path / "run"
    train(load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(data), "data.template": "qa",
                             "train.output_dir": str(run), "train.max_steps": 3, "train.lr": 1e-2,
                             "lora.enabled": True, "lora.r": 4}))
    out = export_run(str(run), str(tmp_path / "merged"))
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(run)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits)  # the adapter did change something


def test_export_dtype(tiny_model_dir, tmp_path):
    out = export_run(str(tiny_model_dir), str(tmp_path / "half"), dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)).dtype == torch.bfloat16
