"""The TRL-0.7-style front: SFTTrainer, DataCollatorForCompletionOnlyLM and the tutorial examples."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftune import DataCollatorForCompletionOnlyLM, SFTTrainer
from sftune.compat.trl07 import EMPTY, NOT_FOUND, FunctionFormat, split_at_response
from sftune.config import load_config
from sftune.data.formats import choose_format
from sftune.data.one_source import prepare_data
from sftune.data.tokenize import IGNORE, RowTokenizer
from sftune.errors import SftuneError
from sftune.model import resolve_max_length

from conftest import CORPUS, build_model_dir, shared_file, write_jsonl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "tutorial"
TEXTS = Dataset.from_list([{"text": t} for t in CORPUS[:7] * 3])


def qa_func(example):
    """The tutorial's batched formatting function (section 2)."""
    return [f"### Question: {q}\n ### Answer: {a}" for q, a in zip(example["instruction"], example["output"])]


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory, gpt2_tokenizer):
    """A tiny GPT-2 with the real GPT-2 tokenizer and 1,024 positions (section 3 uses max_seq_length=1024)."""
    return build_model_dir(tmp_path_factory.mktemp("gpt2-tiny"), gpt2_tokenizer, n_positions=1024)


def run_example(name: str, monkeypatch, *argv) -> dict:
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")


def prepared(trainer):
    """The data exactly as trainer.train() prepares it."""
    max_length = resolve_max_length(trainer.config, trainer.tokenizer, trainer.model.config)
    return prepare_data(trainer.config.data, trainer.tokenizer, max_length, source=trainer.source, fmt=trainer.format)


def mean_loss(model_dir, data, n: int = 16) -> float:
    """Hugging Face's own loss (labels shifted inside the model) over the first n examples."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(min(n, len(data.train))):
            ids, labels = data.train.example(i)
            labels = torch.tensor(labels, dtype=torch.long)[None]
            k = int((labels[0, 1:] != IGNORE).sum())
            total += model(input_ids=torch.tensor(ids, dtype=torch.long)[None], labels=labels).loss.item() * k
            count += k
    return total / count


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def train_losses(out) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# ----------------------------------------------------------------------------- the three tutorial sections


@pytest.mark.shared
def test_section1_imdb_plain_text(gpt2_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "imdb"
    g = run_example("imdb_text", monkeypatch, "--model", gpt2_model_dir, "--data", shared_file("imdb_5000.jsonl"),
                    "--output", out, "--max-steps", 4)
    trainer = g["trainer"]
    cfg = trainer.config
    assert (cfg.data.format, cfg.data.text_column, cfg.data.max_length, cfg.train.epochs) == ("text", "text", 512, 5)
    data = prepared(trainer)
    assert data.report.kept == 1000 and data.report.eos_not_trained == 0
    for i in range(len(data.train)):  # every token is trained, EOS included
        ids, labels = data.train.example(i)
        assert (labels == ids).all()
    assert mean_loss(out, data) < mean_loss(gpt2_model_dir, data)  # same examples, before and after
    assert len(train_losses(out)) == 1  # logging_steps defaults to 500: one loss, at the last step


@pytest.mark.shared
def test_section2_codealpaca_completion_only(gpt2_model_dir, tmp_path, monkeypatch):
    data_file = shared_file("codealpaca_2k.json")
    out = tmp_path / "codealpaca"
    g = run_example("codealpaca_qa", monkeypatch, "--model", gpt2_model_dir, "--data", data_file, "--output", out,
                    "--max-steps", 8)
    trainer, tok = g["trainer"], g["trainer"].tokenizer
    data = prepared(trainer)
    rows = json.loads(data_file.read_text())
    blank = sum(1 for r in rows if not r["output"].strip())
    # the template is found in every text; only rows with an empty answer are skipped
    assert data.report.skipped == ({EMPTY: blank} if blank else {})
    assert data.report.kept == len(rows) - blank
    truncated = 0
    for i in range(len(data.train)):
        ids, labels = data.train.example(i)
        row = rows[int(data.train.rows[i])]
        trained = labels != IGNORE
        assert decode(tok, ids[~trained]) == f"### Question: {row['instruction']}\n ### Answer:"
        if len(ids) == data.max_length and labels[-1] != tok.eos_token_id:
            truncated += 1
            continue
        assert decode(tok, labels[trained]) == f" {row['output']}" + tok.eos_token
    assert truncated == data.report.truncated
    assert mean_loss(out, data) < mean_loss(gpt2_model_dir, data)  # same examples, before and after
    assert len(train_losses(out)) == 1  # logging_steps defaults to 500: one loss, at the last step
    assert trainer.config.data.template == "qa"  # the recipe equivalent the guidance names


@pytest.mark.shared
def test_section3_h4_alpaca_whole_text(gpt2_model_dir, tmp_path, monkeypatch, gpt2_tokenizer):
    alpaca = json.loads(shared_file("alpaca_5000.json").read_text())[:120]
    h4 = write_jsonl(tmp_path / "h4.jsonl", [
        {"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "completion": r["output"],
         "meta": {"category": "alpaca"}} for r in alpaca])
    out = tmp_path / "h4"
    g = run_example("h4_alpaca", monkeypatch, "--model", gpt2_model_dir, "--data", h4, "--output", out,
                    "--max-steps", 20)
    trainer = g["trainer"]
    assert trainer.config.data.max_length == 1024 and trainer.config.train.log_every == 10
    data = prepared(trainer)
    assert data.report.kept == len(alpaca) and not data.report.skipped
    for i in range(len(data.train)):
        ids, labels = data.train.example(i)
        assert (labels == ids).all() and labels[-1] == gpt2_tokenizer.eos_token_id
    losses = train_losses(out)  # logging_steps=10: one loss per 10 steps
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert mean_loss(out, data) < mean_loss(gpt2_model_dir, data)

    # the saved config is a recipe that builds the same text
    recipe = load_config(out / "sftune_config.yaml", {"data.path": str(h4)})
    assert (recipe.data.template, recipe.data.train_on_prompt) == ("alpaca_h4", True)
    fmt = choose_format(recipe.data, ["prompt", "completion"], gpt2_tokenizer)
    for row in trainer.source.train.select(range(10)):
        assert fmt(row).text == trainer.format(row).text

    trainer.save_model(tmp_path / "copy")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "copy")) is not None
    assert AutoTokenizer.from_pretrained(str(tmp_path / "copy")).eos_token == gpt2_tokenizer.eos_token
    assert not (tmp_path / "copy" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- the completion-only split


@settings(max_examples=150, deadline=None)
@given(instruction=st.text(max_size=40), output=st.text(max_size=40).filter(str.strip))
def test_split_never_misses_the_template(tiny_tokenizer, instruction, output):
    """Any text built with the template is split after its last occurrence (as TRL 0.7's collator);
    the trained tokens are exactly the completion + EOS."""
    fmt = FunctionFormat(qa_func, " ### Answer:")
    text = qa_func({"instruction": [instruction], "output": [output]})[0]
    cut = text.rindex(" ### Answer:") + len(" ### Answer:")
    assert fmt({"instruction": instruction, "output": output}).segments == [(text[:cut], False), (text[cut:], True)]
    out = RowTokenizer(fmt, tiny_tokenizer, 10_000, on_bad_row="error", source="t")(
        {"instruction": [instruction], "output": [output], "__row__": [0]})
    assert out["skip"] == [""]
    labels = [t for t in out["labels"][0] if t != IGNORE]
    assert labels[-1] == tiny_tokenizer.eos_token_id
    assert decode(tiny_tokenizer, labels[:-1]) == text[cut:]


def test_template_inside_the_question_splits_at_the_last_occurrence(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                    capsys):
    """TRL 0.7 keeps the last match: a question that itself contains the template is not trained."""
    text = "### Question: what does ' ### Answer:' mean?\n ### Answer: a header"
    assert split_at_response(text, " ### Answer:") == [(text[:-len(" a header")], False), (" a header", True)]
    rows = Dataset.from_list([{"instruction": "what does ' ### Answer:' mean?" if i == 2 else f"q{i}",
                               "output": f"a{i}"} for i in range(5)])
    trainer = SFTTrainer(str(tiny_model_dir), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=rows,
                         formatting_func=qa_func,
                         data_collator=DataCollatorForCompletionOnlyLM(" ### Answer:", tokenizer=tiny_tokenizer))
    capsys.readouterr()
    data = prepared(trainer)
    assert data.report.notes == {"response template occurs more than once": 1}
    assert data.report.note_rows["response template occurs more than once"] == [2]
    err = " ".join(capsys.readouterr().err.split())
    assert "occurs more than once" in err and "rows 2" in err


def test_text_without_template_is_a_counted_skip(tiny_model_dir, tiny_tokenizer, tmp_path, capsys):
    rows = Dataset.from_list([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)])

    def sometimes_without(example):
        texts = qa_func(example)
        return [t.replace("###", "") if q in ("q1", "q4") else t for q, t in zip(example["instruction"], texts)]

    trainer = SFTTrainer(str(tiny_model_dir), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=rows,
                         formatting_func=sometimes_without,
                         data_collator=DataCollatorForCompletionOnlyLM(" ### Answer:", tokenizer=tiny_tokenizer))
    capsys.readouterr()
    data = prepared(trainer)
    assert data.report.skipped == {NOT_FOUND: 2} and data.report.skipped_rows[NOT_FOUND] == [1, 4]
    assert data.report.kept == 4
    err = " ".join(capsys.readouterr().err.split())
    assert "2 of 6 texts in train do not contain the response template ' ### Answer:'" in err


# ----------------------------------------------------------------------------- arguments and saving


def test_training_arguments_map_to_config_keys(tiny_model_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    args = TrainingArguments(output_dir=str(tmp_path / "o"), num_train_epochs=2, learning_rate=1e-4,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=5,
                             save_steps=7, save_total_limit=3, seed=7, max_steps=11, lr_scheduler_type="cosine",
                             warmup_steps=3, weight_decay=0.01, max_grad_norm=0.5, eval_strategy="steps",
                             eval_steps=4, report_to=["tensorboard", "mlflow"], optim="sgd")
    trainer = SFTTrainer(model, args=args, train_dataset=TEXTS, eval_dataset=TEXTS, dataset_text_field="text",
                         max_seq_length=64, packing=True)
    t, d = trainer.config.train, trainer.config.data
    assert (t.output_dir, t.epochs, t.lr, t.batch_size, t.grad_accum, t.log_every, t.save_every, t.keep_checkpoints,
            t.seed, t.max_steps, t.scheduler, t.warmup_steps, t.weight_decay, t.max_grad_norm, t.eval_every,
            t.report_to, t.mixed_precision) == (str(tmp_path / "o"), 2.0, 1e-4, 4, 2, 5, 7, 3, 7, 11, "cosine", 3,
                                                0.01, 0.5, 4, ["tensorboard"], "no")
    assert (d.format, d.text_column, d.max_length, d.packing) == ("text", "text", 64, True)
    assert trainer.config.model.path == str(tiny_model_dir)
    err = " ".join(capsys.readouterr().err.split())
    for shown in ("train.lr=0.0001", "data.max_length=64", "data.packing=true", "args.optim", "ignored",
                  "mlflow: not supported"):
        assert shown in err

    # defaults: max_steps=-1 is no limit; a fractional logging_steps is a share of all steps
    ratio = SFTTrainer(model, args=TrainingArguments(output_dir=str(tmp_path / "r"), logging_steps=0.25,
                                                     max_steps=20, save_strategy="no"),
                       train_dataset=TEXTS, dataset_text_field="text")
    assert (ratio.config.train.log_every, ratio.config.train.save_every) == (5, None)
    default = SFTTrainer(model, train_dataset=TEXTS, dataset_text_field="text")
    assert (default.config.train.output_dir, default.config.train.max_steps) == ("tmp_trainer", None)


def test_model_name_with_lora_trains_and_saves_an_adapter(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, LoraConfig

    rows = Dataset.from_list([{"instruction": f"say {w}", "output": w} for w in ["red", "green", "blue", "gold"] * 4])
    trainer = SFTTrainer(str(tiny_model_dir), args=TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3,
                                                                      logging_steps=1, learning_rate=1e-3),
                         train_dataset=rows, eval_dataset=rows.select(range(4)), formatting_func=qa_func,
                         data_collator=DataCollatorForCompletionOnlyLM(" ### Answer:"), max_seq_length=64,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    lora = trainer.config.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.target_modules) == (True, 4, 8, ["c_attn"])
    assert hasattr(trainer.model, "peft_config")
    with pytest.raises(SftuneError, match="train"):
        trainer.save_model(tmp_path / "early")
    result = trainer.train()
    assert result.steps == 3 and "eval_loss" in result.metrics
    trainer.save_model(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()
    assert AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "saved")) is not None
