"""Tutorial section 1: fine-tune on plain text (IMDb reviews), with the loss on every token.

The tutorial's code, unchanged except for the import (`from sftune import SFTTrainer` instead of
`from trl import SFTTrainer`) and the command line, which names the model, the data and the output:

    python examples/tutorial/imdb_text.py                      # distilgpt2 and imdb from the hub
    python examples/tutorial/imdb_text.py --model ./my-gpt2 --data ../shared/data/imdb_5000.jsonl
"""

import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, TrainingArguments

from sftune import SFTTrainer

parser = argparse.ArgumentParser(description="Tutorial section 1: IMDb plain text.")
parser.add_argument("--model", default="distilgpt2", help="hub id or local model directory")
parser.add_argument("--data", default="imdb", help="hub dataset id, or a local .json/.jsonl file")
parser.add_argument("--output", default="runs/tutorial-imdb", help="output directory")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: all epochs)")
cli = parser.parse_args()

if cli.data.endswith((".json", ".jsonl")):
    dataset = load_dataset("json", data_files=cli.data, split="train")
else:
    dataset = load_dataset(cli.data, split="train")

model = AutoModelForCausalLM.from_pretrained(cli.model)
max_seq_length = 512

trainer = SFTTrainer(
    model,
    args=TrainingArguments(output_dir=cli.output, num_train_epochs=5, max_steps=cli.max_steps),
    train_dataset=dataset.select(range(1000)),
    dataset_text_field="text",
    max_seq_length=max_seq_length,
)
trainer.train()
trainer.save_model()
