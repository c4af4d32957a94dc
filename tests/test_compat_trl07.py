"""Unit tests of sftune.compat.trl07 (the TRL-0.7-style front): the completion-only split, the
collator's arguments, formatting functions batched or per row, and unknown or unsupported
arguments. (The tutorial's three sections end to end, and SFTTrainer training: test_compat.py.)"""

import pytest
from datasets import Dataset

from sftune import DataCollatorForCompletionOnlyLM, SFTTrainer
from sftune.compat.trl07 import NOT_FOUND, FunctionFormat, split_at_response
from sftune.errors import ConfigError, SftuneError

from conftest import CORPUS

TEXTS = Dataset.from_list([{"text": t} for t in CORPUS[:7] * 3])


def qa_func(example):
    """The tutorial's batched formatting function (section 2)."""
    return [f"### Question: {q}\n ### Answer: {a}" for q, a in zip(example["instruction"], example["output"])]


def test_multi_turn_split_with_instruction_template():
    text = "### Human: hi ### Assistant: hello ### Human: bye ### Assistant: ciao"
    assert split_at_response(text, " ### Assistant:", "### Human:") == [
        ("### Human: hi ### Assistant:", False), (" hello ", True),
        ("### Human: bye ### Assistant:", False), (" ciao", True)]
    with pytest.raises(Exception, match=NOT_FOUND):
        split_at_response("no template here", " ### Assistant:")


def test_collator_accepts_token_ids_and_is_not_a_batch_collator(tiny_tokenizer):
    ids = tiny_tokenizer.encode(" ### Answer:", add_special_tokens=False)
    assert DataCollatorForCompletionOnlyLM(ids, tokenizer=tiny_tokenizer).response_template == " ### Answer:"
    with pytest.raises(ConfigError, match="tokenizer"):
        DataCollatorForCompletionOnlyLM(ids)
    with pytest.raises(SftuneError, match="not a batch collator"):
        DataCollatorForCompletionOnlyLM(" ### Answer:")([{"input_ids": [1]}])


def test_formatting_func_batched_or_per_row(tiny_model_dir, tmp_path):
    row = {"instruction": "x", "output": "y"}
    batched = FunctionFormat(qa_func, " ### Answer:")
    per_row = FunctionFormat(lambda ex: f"### Question: {ex['instruction']}\n ### Answer: {ex['output']}",
                             " ### Answer:")
    for fmt, kind in ((batched, True), (per_row, False)):
        assert fmt(row).segments == [("### Question: x\n ### Answer:", False), (" y", True)]
        assert fmt.batched is kind
    assert batched.cache_key() == FunctionFormat(qa_func, " ### Answer:").cache_key()
    assert batched.cache_key() != FunctionFormat(qa_func, "### Answer:").cache_key()
    with pytest.raises(SftuneError, match="KeyError: 'question'"):
        FunctionFormat(lambda ex: [ex["question"][0]])(row)


def test_unknown_and_unsupported_arguments(tiny_model_dir):
    with pytest.raises(TypeError, match="did you mean 'dataset_text_field'"):
        SFTTrainer(str(tiny_model_dir), train_dataset=TEXTS, dataset_text_fields="text")
    with pytest.raises(ConfigError, match="NEFTune"):
        SFTTrainer(str(tiny_model_dir), train_dataset=TEXTS, neftune_noise_alpha=5)
    with pytest.raises(ConfigError, match="DatasetDict"):
        from datasets import DatasetDict

        SFTTrainer(str(tiny_model_dir), train_dataset=DatasetDict(train=TEXTS), dataset_text_field="text")
