"""Hand-off to preference training: two steps of TRL's DPOTrainer and RewardTrainer from an sftune
export and from an sftune LoRA run, with the reference model being the SFT model (not the base:
LLaMA-Factory #8974's "DPO loss 0 after SFT-LoRA")."""

import math

import pytest
import torch

pytest.importorskip("trl", reason="TRL is an optional test dependency (pip install trl): the hand-off tests need it")

from sftune.config import load_config  # noqa: E402
from sftune.export.hf import export_run  # noqa: E402

from conftest import build_tokenizer, write_jsonl  # noqa: E402

pytestmark = pytest.mark.slow

CHATML = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny Llama SFT'd with LoRA on chatml conversations, and its merged export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftune.training import train

    root = tmp_path_factory.mktemp("handoff")
    tok = build_tokenizer(root / "base")
    tok.add_special_tokens({"additional_special_tokens": CHATML})
    tok.save_pretrained(str(root / "base"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)).save_pretrained(str(root / "base"))
    data = write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                           {"role": "assistant", "content": f"hello {i}"}]}
                                             for i in range(16)])
    train(load_config(None, {"model.path": str(root / "base"), "data.path": str(data),
                             "data.chat_template": "chatml", "train.output_dir": str(root / "run"),
                             "train.max_steps": 3, "train.lr": 1e-2, "lora.enabled": True, "lora.r": 4}))
    export_run(str(root / "run"), str(root / "export"))
    return root


def preferences():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"hi {i}"}],
                               "chosen": [{"role": "assistant", "content": f"hello {i}"}],
                               "rejected": [{"role": "assistant", "content": "go away"}]} for i in range(8)])


def args(cls, out, **kw):
    return cls(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
               logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True, **kw)


def first_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_dpo_from_export(sft, tmp_path):
    """A merged export is a plain model: the reference TRL loads from the same path is the SFT model."""
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(sft / "export"))
    trainer = DPOTrainer(model=str(sft / "export"), args=args(DPOConfig, tmp_path, beta=0.1),
                         train_dataset=preferences(), processing_class=tok)
    trainer.train()
    losses = first_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0


def test_dpo_from_lora_run(sft, tmp_path):
    """Load the SFT adapter *trainable* on the base and give no ref_model: TRL copies the adapter as
    the "ref" adapter, so the reference is the SFT model; with the adapter disabled it would be the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(sft / "run"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft / "base")), str(sft / "run"),
                                      is_trainable=True)
    trainer = DPOTrainer(model=model, args=args(DPOConfig, tmp_path, beta=0.1), train_dataset=preferences(),
                         processing_class=tok)
    assert "ref" in model.peft_config
    ids = torch.tensor([tok("<|im_start|>user\nhi 3<|im_end|>\n")["input_ids"]])
    sft_model = AutoModelForCausalLM.from_pretrained(str(sft / "export")).eval()
    model.eval()
    with torch.no_grad():
        model.set_adapter("ref")
        ref_logits = model(ids).logits
        with model.disable_adapter():
            base_logits = model(ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(ref_logits, sft_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ref_logits, base_logits, atol=1e-4)  # the SFT did change the model
    model.train()
    trainer.train()
    losses = first_losses(trainer)
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("start", ["export", "lora_run"])
def test_reward_model(sft, tmp_path, start):
    """A reward model starts from the SFT weights with a new scalar head: from the export directly, or
    from a LoRA run by merging the adapter into a sequence-classification copy of the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    if start == "export":
        tok = AutoTokenizer.from_pretrained(str(sft / "export"))
        model = AutoModelForSequenceClassification.from_pretrained(str(sft / "export"), num_labels=1)
    else:
        tok = AutoTokenizer.from_pretrained(str(sft / "run"))
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft / "base")), str(sft / "run"))
        model = AutoModelForSequenceClassification.from_pretrained(str(sft / "base"), num_labels=1)
        model.model.load_state_dict(lm.merge_and_unload().model.state_dict())  # SFT body, new score head
    model.config.pad_token_id = tok.pad_token_id
    sft_model = AutoModelForCausalLM.from_pretrained(str(sft / "export"))
    backbone = model.model
    ids = torch.tensor([tok("<|im_start|>user\nhi 3<|im_end|>\n")["input_ids"]])
    with torch.no_grad():  # the reward model's body is the SFT model's (with the adapter applied)
        torch.testing.assert_close(backbone(ids).last_hidden_state, sft_model.model(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    trainer = RewardTrainer(model=model, args=args(RewardConfig, tmp_path), train_dataset=preferences(),
                            processing_class=tok)
    # the prompt contract: TRL renders each chosen conversation to exactly the ids sftune trained on
    trained = sft_ids(sft, tok)
    rows = list(trainer.train_dataset)
    assert [r["chosen_ids"] for r in rows] == [trained[k] for k in range(len(rows))]
    with torch.no_grad():
        margins = [reward_margin(model, r) for r in rows]
    trainer.train()
    losses = first_losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # the first step's loss is the Bradley-Terry loss of the model as handed off, on its batch of two
    pairs = [(softplus(-margins[a]) + softplus(-margins[b])) / 2 for a in range(len(rows)) for b in range(a)]
    assert min(abs(losses[0] - x) for x in pairs) < 1e-4, (losses[0], pairs)


def softplus(x: float) -> float:
    return float(torch.nn.functional.softplus(torch.tensor(x)))


def reward_margin(model, row) -> float:
    """The reward model's score of the chosen minus the rejected conversation."""
    was = model.training
    model.eval()
    score = [model(torch.tensor([row[k]])).logits.squeeze().item() for k in ("chosen_ids", "rejected_ids")]
    model.train(was)
    return score[0] - score[1]


def sft_ids(sft, tok) -> dict[int, list[int]]:
    """The ids sftune trained on, per conversation row (through the chain's prepare, as training)."""
    from sftune.data.chain import prepare

    cfg = load_config(None, {"data.path": str(sft / "chat.jsonl"), "data.chat_template": "chatml"})
    data = prepare(cfg.data, tok, 256)
    return {int(data.train.rows[i]): data.train.example(i)[0].tolist() for i in range(len(data.train))}
