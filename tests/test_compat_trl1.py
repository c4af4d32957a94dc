"""The TRL 1.x front: the same short script with ``from trl`` and ``from sftune`` gives the same step-1 loss.

"The same" is up to one known difference, corrected by :func:`position0_factor`: TRL 1.16 counts
each row's first label in the loss denominator when the whole text is trained.

Every case trains the whole (8-row) dataset in one step, so the batch order of the two libraries
does not matter and step 1's loss is a function of the data, the masks and the model only. With
TRL installed, both run (three cases by default, every case with SFTUNE_TEST_TRL=1); otherwise the
loss is checked against GOLDEN (recorded from TRL 1.16 by this test).
"""

import importlib.util
import json
import math
import os

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sftune import SFTConfig, SFTTrainer
from sftune.compat.trl1 import dataset_type
from sftune.errors import ConfigError

# With TRL installed, three cases run TRL too and the others are checked against GOLDEN (TRL costs about
# 10 s a case); SFTUNE_TEST_TRL=1 runs TRL for every case (to re-record GOLDEN), SFTUNE_TEST_GOLDEN=1 for none
HAS_TRL = importlib.util.find_spec("trl") is not None and not os.environ.get("SFTUNE_TEST_GOLDEN")
TRL_CASES = {"text", "prompt_completion", "messages_assistant_only"}

CHAT = ("{% if tools %}tools: {{ tools | tojson }}\n{% endif %}{% if greeting is defined %}{{ greeting }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}:\n{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}")
QA = [("What is the capital of France?", "Paris is the capital."), ("Sort the list.", "[1, 2, 3]"),
      ("Say hello.", "Hello world!"), ("Add two numbers.", "def add(a, b):\n    return a + b"),
      ("Review the movie.", "I loved this movie."), ("Name a fox.", "The quick brown fox."),
      ("Describe the task.", "Below is an instruction."), ("Unicode?", "héllo wörld, naïve café")]


def rows(kind: str) -> list[dict]:
    if kind == "text":
        return [{"text": f"### Question: {q}\n ### Answer: {a}"} for q, a in QA]
    if kind == "prompt_completion":
        return [{"prompt": f"### Question: {q}\n ### Answer:", "completion": f" {a}"} for q, a in QA]
    if kind == "messages":
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    if kind == "messages_tools":  # TRL's tools column (JSON text) and per-row chat_template_kwargs
        tool = json.dumps([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])
        return [{**r, "tools": tool, "chat_template_kwargs": {"greeting": f"hi {i}"}}
                for i, r in enumerate(rows("messages"))]
    if kind == "conversations":
        return [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    if kind == "conversational_pc":
        return [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                for q, a in QA]
    if kind == "qa_columns":
        return [{"question": q, "answer": a} for q, a in QA]
    raise ValueError(kind)


def tokenized(tok) -> list[dict]:
    """Pre-tokenized prompt-completion rows, as TRL's own tokenization writes them (EOS appended)."""
    out = []
    for r in rows("prompt_completion"):
        prompt = tok(r["prompt"])["input_ids"]
        ids = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    return out


def qa_text(example):
    return f"Q: {example['question']}\nA: {example['answer']}"


# name -> (data, SFTConfig fields, trainer extras)
CASES = {
    "text": ("text", {}, {}),
    "prompt_completion": ("prompt_completion", {}, {}),
    "prompt_completion_whole": ("prompt_completion", {"completion_only_loss": False}, {}),
    "messages": ("messages", {}, {}),
    "messages_assistant_only": ("messages", {"assistant_only_loss": True}, {}),
    "messages_tools": ("messages_tools", {}, {}),
    "lora": ("prompt_completion", {}, {"peft_config": "lora"}),
    "sharegpt": ("conversations", {}, {}),  # TRL 1.16 refuses assistant_only_loss on ShareGPT rows
    "conversational_prompt_completion": ("conversational_pc", {}, {}),
    "formatting_func": ("qa_columns", {}, {"formatting_func": qa_text}),
    "packing": ("text", {"packing": True, "max_length": 64}, {}),
    "tokenized": ("tokenized", {"completion_only_loss": True}, {}),
    "model_object": ("prompt_completion", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                                           "lr_scheduler_type": "cosine"}, {"model": "object"}),
    "grad_accum_cosine": ("prompt_completion", {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                                                "lr_scheduler_type": "cosine", "warmup_steps": 1}, {}),
}
# TRL packs with SDPA on CPU without separating the examples (they attend to each other), so its packed loss
# is not the examples' loss: the packed run is compared with TRL's unpacked one (sftune: packed == unpacked)
REF_FIELDS = {"packing": {}}
# TRL 1.16 renames ShareGPT's keys but keeps its roles ("human", "gpt"), which chat templates do not know;
# sftune maps them to user / assistant, so its ShareGPT run is compared with TRL's run on the same messages
REF_DATA = {"sharegpt": "messages"}
# step-1 loss of each case with TRL 1.16 (from trl import SFTTrainer, SFTConfig), recorded by this test
GOLDEN = {
    "conversational_prompt_completion": 5.989383697509766,
    "formatting_func": 5.992127569228256,
    "grad_accum_cosine": 5.99656343460083,
    "lora": 5.99656343460083,
    "messages": 5.9851199172613185,
    "messages_assistant_only": 5.989383697509766,
    "messages_tools": 5.9745755919927275,
    "model_object": 5.99656343460083,
    "packing": 6.014028788602205,
    "prompt_completion": 5.99656343460083,
    "prompt_completion_whole": 6.014028788602205,
    "sharegpt": 5.9851199172613185,
    "text": 6.014028788602205,
    "tokenized": 5.99656343460083,
}


def script(lib: str, model_dir, out, data: str, fields: dict, extras: dict, **more):
    """The TRL 1.x script, with its one import line from ``lib``."""
    if lib == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from sftune import SFTConfig, SFTTrainer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = CHAT
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, logging_steps=1,
                learning_rate=1e-3, bf16=False, report_to="none", save_strategy="no", seed=0, use_cpu=True)
    args = SFTConfig(**{**base, **fields})
    data_rows = tokenized(tok) if data == "tokenized" else rows(data)
    if extras.get("peft_config") == "lora":
        from peft import LoraConfig

        extras = {**extras, "peft_config": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                                                      task_type="CAUSAL_LM")}
    model = str(model_dir)
    if extras.get("model") == "object":  # a loaded model instead of its name
        from transformers import AutoModelForCausalLM

        model, extras = AutoModelForCausalLM.from_pretrained(model), {k: v for k, v in extras.items() if k != "model"}
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data_rows),
                         processing_class=tok, **extras, **more)
    return trainer, trainer.train()


def position0_factor(trainer) -> float:
    """TRL 1.16 with transformers 5.24 divides the summed token loss by every label of the batch,
    including each row's first, which no position predicts (``_loss_shifts_labels`` is False for a
    model config without ``loss_type``, such as GPT-2's). sftune divides by the predicted tokens: the
    true mean. This factor turns TRL's logged loss into the true mean (1 when the first token is
    not trained, as in completion-only loss)."""
    labels = trainer.train_dataset["labels"]
    every = sum(sum(t != -100 for t in row) for row in labels)
    predicted = sum(sum(t != -100 for t in row[1:]) for row in labels)
    return every / predicted


def step_loss(history, step: int = 1) -> float:
    return next(r["loss"] for r in history if r.get("step") == step and "loss" in r)


CORE = {"loss", "grad_norm", "learning_rate", "epoch", "step"}
FINAL = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "epoch", "step"}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_step1_loss_equals_trl(case, tiny_model_dir, tmp_path):
    data, fields, extras = CASES[case]
    trainer, out = script("sftune", tiny_model_dir, tmp_path / "sftune", data, fields, extras)
    loss = step_loss(trainer.state.log_history)
    assert out.global_step == 2 and set(out._fields) == {"global_step", "training_loss", "metrics"}
    assert CORE <= set(trainer.state.log_history[0]) and FINAL <= set(trainer.state.log_history[-1])
    assert math.isfinite(out.training_loss) and FINAL - {"step"} <= set(out.metrics)
    if HAS_TRL and (case in TRL_CASES or os.environ.get("SFTUNE_TEST_TRL")):
        ref_trainer, ref_out = script("trl", tiny_model_dir, tmp_path / "trl", REF_DATA.get(case, data),
                                      REF_FIELDS.get(case, fields), extras)
        ref = step_loss(ref_trainer.state.log_history) * position0_factor(ref_trainer)
        # the same record shapes (TRL adds metrics of the logits, which sftune never materialises)
        extra = {"entropy", "mean_token_accuracy", "total_flos"}
        assert set(ref_trainer.state.log_history[0]) - extra == set(trainer.state.log_history[0]) - extra
        assert set(ref_trainer.state.log_history[-1]) - extra == set(trainer.state.log_history[-1]) - extra
        assert ref_out.global_step == out.global_step
        print(f"GOLDEN {case!r}: {ref!r}")
    else:
        ref = GOLDEN[case]
    assert loss == pytest.approx(ref, rel=1e-4)


def test_dataset_types():
    assert dataset_type(Dataset.from_list(rows("text")), "text") == "language_modeling"
    assert dataset_type(Dataset.from_list(rows("prompt_completion")), "text") == "prompt_completion"
    assert dataset_type(Dataset.from_list(rows("messages")), "text") == "conversational"
    assert dataset_type(Dataset.from_list(rows("conversations")), "text") == "conversational"
    assert dataset_type(Dataset.from_list(rows("conversational_pc")), "text") == "conversational_prompt_completion"
    assert dataset_type(Dataset.from_list([{"input_ids": [1, 2]}]), "text") == "tokenized"
    with pytest.raises(ConfigError, match="dataset_text_field"):
        dataset_type(Dataset.from_list(rows("qa_columns")), "text")


def test_sftconfig_defaults_are_trl_defaults():
    args = SFTConfig(output_dir="x")
    assert (args.learning_rate, args.logging_steps, args.max_length, args.gradient_checkpointing) == (2e-5, 10, 1024,
                                                                                                      True)
    assert (args.packing_strategy, args.completion_only_loss, args.assistant_only_loss, args.loss_type) == \
        ("bfd", None, False, "nll")
    if HAS_TRL:
        import dataclasses

        from trl import SFTConfig as TrlSFTConfig

        ours = {f.name for f in dataclasses.fields(SFTConfig)}
        missing = {f.name for f in dataclasses.fields(TrlSFTConfig)} - ours
        assert not missing, f"TRL's SFTConfig fields sftune's does not take: {missing}"


def test_refused_fields_say_what_to_use(tiny_model_dir, tmp_path):
    ds = Dataset.from_list(rows("text"))
    for fields, match in (({"loss_type": "dft"}, "nll"), ({"packing": True, "packing_strategy": "wrapped"}, "bfd"),
                          ({"activation_offloading": True}, "gradient checkpointing"),
                          ({"dataset_kwargs": {"skip_prepare_dataset": True}}, "prepares the data"),
                          ({"completion_only_loss": True}, "prompt-completion"),
                          ({"assistant_only_loss": True}, "conversational")):
        with pytest.raises(ConfigError, match=match):
            SFTTrainer(str(tiny_model_dir), args=SFTConfig(output_dir=str(tmp_path), bf16=False, **fields),
                       train_dataset=ds)
    with pytest.raises(ConfigError, match="compute_metrics"):
        SFTTrainer(str(tiny_model_dir), args=SFTConfig(output_dir=str(tmp_path), bf16=False), train_dataset=ds,
                   compute_metrics=lambda p: {})


def test_tools_with_assistant_only_loss_needs_the_data_keys(tiny_model_dir, tmp_path):
    """Replies only, with a tools column: mapped onto data.tools_column / data.chat_template_kwargs."""
    from sftune.config import DataConfig

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = CHAT
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, assistant_only_loss=True)
    ds = Dataset.from_list(rows("messages_tools"))
    if not {"tools_column", "chat_template_kwargs"} <= set(DataConfig.model_fields):
        with pytest.raises(ConfigError, match="tools_column"):
            SFTTrainer(str(tiny_model_dir), args=args, train_dataset=ds, processing_class=tok)
        pytest.skip("data.tools_column / data.chat_template_kwargs are not in this sftune's config yet")
    trainer = SFTTrainer(str(tiny_model_dir), args=args, train_dataset=ds, processing_class=tok)
    assert trainer.config.data.tools_column == "tools"  # the per-row chat_template_kwargs column is read as is
