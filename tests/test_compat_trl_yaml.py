"""``sftune train --trl-config sft.yaml`` (``sftune.compat.trl_yaml``): a TRL CLI config runs as it is."""

import json

import pytest
from test_compat_trl1 import rows

from sftune.errors import ConfigError


def test_trl_cli_yaml(tiny_model_dir, tmp_path):
    """`sftune train --trl-config sft.yaml`: TRL's CLI keys (script, ModelConfig with LoRA, SFTConfig)."""
    from sftune.cli import main

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows("prompt_completion")))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'run'}\n"
                   "max_steps: 2\nper_device_train_batch_size: 8\nlearning_rate: 1.0e-3\nbf16: false\n"
                   "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.0\nlora_target_modules: [c_attn]\n")
    assert main(["train", "--trl-config", str(cfg)]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    cfg.write_text(cfg.read_text() + "lora_alpah: 8\n")
    with pytest.raises(ConfigError, match="did you mean 'lora_alpha'"):
        from sftune.compat.trl_yaml import load_trl_config

        load_trl_config(cfg)
