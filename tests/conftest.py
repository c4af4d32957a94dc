"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny GPT-2 models, built locally.

Nothing here touches the network: hub access is switched off for the whole session, and the
datasets cache lives in a temporary directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

_CACHE = tempfile.mkdtemp(prefix="sftune-test-hf-")
os.environ["HF_HOME"] = _CACHE
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one thread each, no oversubscription
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "### Question: What is the capital of France?\n ### Answer: Paris is the capital.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSort the list.\n\n### Response:\n[1, 2, 3]",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Unicode: héllo wörld, naïve café, 日本語, emoji 🙂.",
    "I loved this movie. The acting was great but the plot was thin.",
] * 20


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   model_max_length=256, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(path))
    return fast


def build_model_dir(path: Path, tokenizer, **overrides):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("model"), tiny_tokenizer)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    path = SHARED / "models" / "gpt2-tokenizer"
    if not path.exists():
        pytest.skip("../shared/models/gpt2-tokenizer is absent (only CI and developer machines have ../shared)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def shared_file(name: str) -> Path:
    path = SHARED / "data" / name
    if not path.exists():
        pytest.skip(f"../shared/data/{name} is absent (only CI and developer machines have ../shared)")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA_ROWS = [{"instruction": "word " * (1 + (i * 7) % 23), "output": "answer " * (1 + (i * 5) % 11)} for i in range(40)]


@pytest.fixture(scope="session")
def qa_rows_file(tmp_path_factory):
    """40 question/answer rows of varied lengths (the `qa` template's instruction/output columns)."""
    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", QA_ROWS)


def train_config(model_dir, data_file, out, **over):
    """A small, fast training config over the qa rows; ``over`` adds or replaces keys."""
    from sftune.config import load_config

    base = {"model.path": str(model_dir), "data.path": str(data_file), "data.template": "qa",
            "data.max_length": 128, "train.output_dir": str(out), "train.log_every": 1, "train.lr": 1e-3,
            "train.max_grad_norm": 1e9, "train.warmup_steps": 0}
    base.update(over)
    return load_config(None, base)


@pytest.fixture(scope="session")
def dropout_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny model with dropout on (0.1 everywhere): RNG state matters for exact resume."""
    return build_model_dir(tmp_path_factory.mktemp("dropout_model"), tiny_tokenizer, resid_pdrop=0.1,
                           embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.fixture
def no_plots(monkeypatch):
    """The report's plots take most of a tiny run's time; tests that check other things skip them."""
    monkeypatch.setattr("sftune.training.build_report", lambda out: Path(out) / "report.md")


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """``vlm(style)``: the tiny vision-language model directory of a style (tests/vision_models.py), built once."""
    import vision_models

    built = {}

    def get(style: str) -> Path:
        if style not in built:
            built[style] = vision_models.build(style, tmp_path_factory.mktemp(style))
        return built[style]

    return get
