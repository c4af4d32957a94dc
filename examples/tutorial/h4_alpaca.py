"""Tutorial section 3: Alpaca-format prompts on HuggingFaceH4/instruction-dataset, whole text trained.

The tutorial's code, unchanged except for the import (`from sftune import SFTTrainer` instead of
`from trl import SFTTrainer`) and the command line:

    python examples/tutorial/h4_alpaca.py                      # distilgpt2 and the H4 dataset from the hub
    python examples/tutorial/h4_alpaca.py --model ./my-gpt2 --data h4.jsonl   # rows: prompt, completion, meta
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftune import SFTTrainer

parser = argparse.ArgumentParser(description="Tutorial section 3: H4 instruction dataset, Alpaca format.")
parser.add_argument("--model", default="distilgpt2", help="hub id or local model directory")
parser.add_argument("--data", default="HuggingFaceH4/instruction-dataset",
                    help="hub dataset id, or a local .json/.jsonl file with prompt, completion and meta")
parser.add_argument("--output", default="runs/tutorial-h4-alpaca", help="output directory")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: all epochs)")
cli = parser.parse_args()

if cli.data.endswith((".json", ".jsonl")):
    dataset = load_dataset("json", data_files=cli.data, split="train")
else:
    dataset = load_dataset(cli.data, split="test")
dataset = dataset.remove_columns(["meta"])

model_id = cli.model
tokenizer = AutoTokenizer.from_pretrained(model_id)
tokenizer.pad_token = tokenizer.eos_token
model = AutoModelForCausalLM.from_pretrained(model_id)


def format_instruction(sample):
    output_texts = []
    for i in range(len(sample["prompt"])):
        output_texts.append(
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{sample['prompt'][i]}\n\n### Response:\n{sample['completion'][i]}"
        )
    return output_texts


args = TrainingArguments(
    output_dir=cli.output,
    num_train_epochs=3,
    per_device_train_batch_size=8,
    learning_rate=5e-5,
    lr_scheduler_type="linear",
    logging_steps=10,
    max_steps=cli.max_steps,
)

trainer = SFTTrainer(
    model,
    train_dataset=dataset,
    tokenizer=tokenizer,
    max_seq_length=1024,
    formatting_func=format_instruction,
    args=args,
)
trainer.train()
trainer.save_model()
