"""Tutorial section 2: question/answer instruction tuning on CodeAlpaca, loss on the answer only.

The tutorial's code, unchanged except for the import (`from sftune import SFTTrainer,
DataCollatorForCompletionOnlyLM` instead of `from trl import ...`) and the command line:

    python examples/tutorial/codealpaca_qa.py                  # distilgpt2 and CodeAlpaca-20k from the hub
    python examples/tutorial/codealpaca_qa.py --model ./my-gpt2 --data ../shared/data/codealpaca_2k.json

Each text is split at the first " ### Answer:" as a string; the prompt up to and including it gets
no loss, the answer and its EOS do. A text without the template is skipped and counted.
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftune import DataCollatorForCompletionOnlyLM, SFTTrainer

parser = argparse.ArgumentParser(description="Tutorial section 2: CodeAlpaca question/answer.")
parser.add_argument("--model", default="distilgpt2", help="hub id or local model directory")
parser.add_argument("--data", default="lucasmccabe-lmi/CodeAlpaca-20k",
                    help="hub dataset id, or a local .json/.jsonl file")
parser.add_argument("--output", default="runs/tutorial-codealpaca", help="output directory")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: all epochs)")
cli = parser.parse_args()

if cli.data.endswith((".json", ".jsonl")):
    dataset = load_dataset("json", data_files=cli.data, split="train")
else:
    dataset = load_dataset(cli.data, split="train")

model = AutoModelForCausalLM.from_pretrained(cli.model)
tokenizer = AutoTokenizer.from_pretrained(cli.model)


def formatting_prompts_func(example):
    output_texts = []
    for i in range(len(example['instruction'])):
        text = f"### Question: {example['instruction'][i]}\n ### Answer: {example['output'][i]}"
        output_texts.append(text)
    return output_texts


response_template = " ### Answer:"
collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=tokenizer)

trainer = SFTTrainer(
    model,
    args=TrainingArguments(output_dir=cli.output, max_steps=cli.max_steps),
    train_dataset=dataset,
    formatting_func=formatting_prompts_func,
    data_collator=collator,
)
trainer.train()
trainer.save_model()
