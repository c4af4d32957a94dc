"""The training engine: loss normalisation, resume, checkpoints, saving, LoRA, recipes."""

import json
from pathlib import Path

import pytest
import torch

from sftune.training import loop, setup, train

from conftest import build_model_dir, write_jsonl
from conftest import train_config as cfg_for

@pytest.fixture(scope="module")
def qa_file(qa_rows_file):
    return qa_rows_file


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out):
    return {m["step"]: m for m in metrics(out) if "loss" in m}


def weights(out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, tol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_invariance(tiny_model_dir, qa_file, tmp_path, packing):
    """1 micro-batch of 8 == 4 micro-batches of 2 == 8 of 1: same loss, gradient norm and weights."""
    runs = {}
    for bs, ga in [(8, 1), (2, 4), (1, 8)]:
        out = tmp_path / f"{bs}x{ga}"
        train(cfg_for(tiny_model_dir, qa_file, out, **{"train.batch_size": bs, "train.grad_accum": ga,
                                                        "train.max_steps": 3, "data.packing": packing,
                                                        "data.max_length": 64}))
        runs[(bs, ga)] = (train_losses(out), weights(out))
    ref_losses, ref_w = runs[(8, 1)]
    for key, (losses, w) in runs.items():
        for step in (1, 2, 3):
            assert losses[step]["loss"] == pytest.approx(ref_losses[step]["loss"], rel=1e-5), key
            assert losses[step]["grad_norm"] == pytest.approx(ref_losses[step]["grad_norm"], rel=1e-4), key
        assert_same_weights(ref_w, w)


def test_per_token_normalisation_not_mean_of_means(tiny_model_dir, qa_file, tmp_path):
    """The logged step loss is sum(token losses) / step tokens, independent of the micro-batch split."""
    out = tmp_path / "run"
    train(cfg_for(tiny_model_dir, qa_file, out, **{"train.batch_size": 4, "train.grad_accum": 2,
                                                    "train.max_steps": 1, "train.lr": 1e-9}))
    from transformers import AutoModelForCausalLM

    from sftune.data.packing import BatchPlan
    from sftune.data.one_source import prepare_data
    from sftune.loss import CausalLMWithLoss
    from sftune.model import load_tokenizer

    cfg = cfg_for(tiny_model_dir, qa_file, out, **{"train.batch_size": 4, "train.grad_accum": 2})
    tok, _ = load_tokenizer(cfg)
    data = prepare_data(cfg.data, tok, 128)
    plan = BatchPlan.build(data.train.lengths, batch_size=4, grad_accum=2, packing=False, max_length=128, seed=42)
    lm = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for units in plan.micro_batches(plan.epoch_steps(0)[0]):
            b = plan.batch(units, data.train, tok.pad_token_id)
            s = lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets).item()
            total, count = total + s, count + b.n_loss
            means.append(s / b.n_loss)
    logged = train_losses(out)[1]["loss"]
    assert logged == pytest.approx(total / count, rel=1e-5)
    assert abs(logged - sum(means) / len(means)) > 1e-4  # the per-batch mean would differ here


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("dropout_model"), tiny_tokenizer, resid_pdrop=0.1,
                           embd_pdrop=0.1, attn_pdrop=0.1)


def test_resume_matches_uninterrupted_run(dropout_model_dir, qa_file, tmp_path):
    """Ctrl-C at step 4 saves a checkpoint; resume=true then reproduces the uninterrupted run."""
    over = {"train.batch_size": 4, "train.grad_accum": 2, "train.max_steps": 8, "train.epochs": 1,
            "train.scheduler": "cosine", "train.warmup_steps": 2, "train.max_grad_norm": 1.0}
    full = tmp_path / "full"
    train(cfg_for(dropout_model_dir, qa_file, full, **over))

    # an interruption at step 4, through the public seams: setup() builds the run, loop() trains it
    cut = tmp_path / "cut"
    run = setup(cfg_for(dropout_model_dir, qa_file, cut, **over))
    batches = run.feed.batches

    def interrupt_at_4(step):
        if step == 4:
            raise KeyboardInterrupt
        return batches(step)

    run.feed.batches = interrupt_at_4
    result = loop(run)
    assert result.interrupted and result.step == 4
    assert (cut / "checkpoints" / "step-0000004" / "trainer_state.json").exists()
    train(cfg_for(dropout_model_dir, qa_file, cut, **over, **{"train.resume": True}))

    a, b = train_losses(full), train_losses(cut)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-9), step
    assert_same_weights(weights(full), weights(cut), tol=1e-6)


def test_final_save_is_standard_hf(tiny_model_dir, qa_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "final"
    result = train(cfg_for(tiny_model_dir, qa_file, out, **{"train.max_steps": 2, "data.eval_split": 0.1}))
    assert result.metrics["eval_loss"] > 0
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert (out / "sftune_config.yaml").exists() and (out / "data_report.json").exists()
    # the prompt template travels with the tokenizer as a chat template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What?"}], tokenize=False)
    assert prompt == "### Question: What?\n ### Answer:"
    assert model.generation_config.eos_token_id in (tok.eos_token_id, [tok.eos_token_id])
    kinds = {m.get("final", False) for m in metrics(out)}
    assert kinds == {False, True}


def test_lora_adapter_and_merge(tiny_model_dir, qa_file, tmp_path, capsys):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    train(cfg_for(tiny_model_dir, qa_file, out, **{"train.max_steps": 2, "lora.enabled": True, "lora.r": 4}))
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert peft_model is not None
    merged_dir = tmp_path / "merged"
    train(cfg_for(tiny_model_dir, qa_file, merged_dir, **{"train.max_steps": 2, "lora.enabled": True,
                                                          "lora.r": 4, "lora.merge": True}))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model.eval()(ids).logits, rtol=1e-4, atol=1e-4)
    assert "trainable of" in capsys.readouterr().err


def test_qlora_on_cpu_is_a_clear_error(tiny_model_dir, qa_file, tmp_path):
    from sftune.errors import ConfigError

    with pytest.raises(ConfigError, match="QLoRA"):
        train(cfg_for(tiny_model_dir, qa_file, tmp_path / "q", **{"lora.enabled": True, "lora.load_in_4bit": True}))


def test_loss_decreases(tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "learn"
    train(cfg_for(tiny_model_dir, qa_file, out, **{"train.max_steps": 30, "train.lr": 3e-3, "train.batch_size": 8}))
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_compile_gives_the_same_loss(tiny_model_dir, qa_file, tmp_path):
    """train.compile=true (torch.compile) trains to the same losses as eager mode (with its rows and
    loss slots bucketed to 128 by train.bucket=auto)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    over = {"train.max_steps": 2, "train.batch_size": 4, "data.limit": 8}
    train(cfg_for(tiny_model_dir, qa_file, eager, **over))
    train(cfg_for(tiny_model_dir, qa_file, compiled, **over, **{"train.compile": True}))
    a, b = train_losses(eager), train_losses(compiled)
    for step in (1, 2):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-4)


def test_bucketed_rows_train_to_the_same_loss(tiny_model_dir, qa_file, tmp_path):
    """train.bucket (rows padded to multiples of 64, what train.compile uses at 128) changes no loss
    and no trained-token count: the padding carries no loss and no example sees it."""
    plain, bucketed = tmp_path / "plain", tmp_path / "bucketed"
    over = {"train.max_steps": 3, "train.batch_size": 4, "data.limit": 12}
    train(cfg_for(tiny_model_dir, qa_file, plain, **over))
    train(cfg_for(tiny_model_dir, qa_file, bucketed, **over, **{"train.bucket": 64}))
    a, b = train_losses(plain), train_losses(bucketed)
    for step in (1, 2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5)
        assert b[step]["loss_tokens"] == a[step]["loss_tokens"]


CHAT_ROWS = [{"messages": [{"role": "user", "content": "word " * (1 + i % 5)},
                           {"role": "assistant", "content": "answer " * (1 + i % 4), "weight": 0.25 + (i % 3)},
                           {"role": "user", "content": "more"},
                           {"role": "assistant", "content": "fine " * (1 + i % 2), "train": i % 4 != 0}]}
             for i in range(24)]


def test_message_weights_keep_grad_accumulation_invariance(tiny_model_dir, tmp_path):
    """With per-message weights the normaliser is the step's summed weight: 8x1 == 2x4 == 1x8."""
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    runs = {}
    for bs, ga in [(8, 1), (2, 4), (1, 8)]:
        out = tmp_path / f"{bs}x{ga}"
        train(cfg_for(tiny_model_dir, data, out, **{"data.template": None, "data.chat_template": "chatml",
                                                    "train.batch_size": bs, "train.grad_accum": ga,
                                                    "train.max_steps": 2}))
        runs[(bs, ga)] = (train_losses(out), weights(out))
    ref_losses, ref_w = runs[(8, 1)]
    for key, (losses, w) in runs.items():
        for step in (1, 2):
            assert losses[step]["loss"] == pytest.approx(ref_losses[step]["loss"], rel=1e-5), key
        assert_same_weights(ref_w, w)
