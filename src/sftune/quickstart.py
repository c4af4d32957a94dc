"""The offline quickstart: generated instruction data and a tiny byte-level GPT-2 shipped in the package.

The tasks are small string functions (reverse the letters, upper-case them, sort them) over
random letter strings. The held-out split uses strings that never appear in training, so
exact match on it measures whether the model learned the task format *and* the functions, and
whether it stops at EOS by itself. ``sftune train quickstart`` reports it before and after
training.

``builtin:quickstart-noisy`` is the same data with one training answer in five wrong (random
letters of the right length and case, as a careless annotator or a weak generator writes them);
the held-out split stays clean. It is where a teacher's distribution shows what the data's token
cannot: the distillation demonstration (``bench/distill_quickstart.py``, the README).

``python -m sftune.quickstart --write-assets`` regenerates the shipped tokenizer and model config.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

TASKS = {
    "reverse": lambda w: w[::-1],
    "upper": lambda w: w.upper(),
    "sort": lambda w: "".join(sorted(w)),
}
TRAIN_ROWS = 20000
TEST_ROWS = 200
SEED = 1234
NOISE = 0.2
"""``builtin:quickstart-noisy``: the share of training answers replaced by a wrong one."""


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))


def make_rows(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[dict]:
    rows, tasks = [], list(TASKS)
    while len(rows) < n:
        word = _word(rng)
        if word in exclude:
            continue
        task = tasks[len(rows) % len(tasks)]
        rows.append({"instruction": f"{task} {word}", "output": TASKS[task](word), "task": task, "word": word})
    return rows


def make_dataset(train_rows: int = TRAIN_ROWS, test_rows: int = TEST_ROWS, seed: int = SEED):
    """A ``DatasetDict`` with ``train`` and ``test``; test words never occur in train."""
    import datasets

    rng = random.Random(seed)
    train = make_rows(train_rows, rng)
    seen = {r["word"] for r in train}
    test = make_rows(test_rows, random.Random(seed + 1), exclude=seen)
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                 "test": datasets.Dataset.from_list(test)})


def make_noisy_dataset(noise: float = NOISE, seed: int = SEED):
    """:func:`make_dataset` with about ``noise`` of the training answers wrong (column ``correct``
    says which); the held-out split is unchanged."""
    import datasets

    ds = make_dataset(seed=seed)
    rng = random.Random(seed + 2)
    rows = []
    for row in ds["train"]:
        row = dict(row, correct=True)
        if rng.random() < noise:
            letters = string.ascii_uppercase if row["output"].isupper() else string.ascii_lowercase
            wrong = row["output"]
            while wrong == row["output"]:
                wrong = "".join(rng.choice(letters) for _ in row["output"])
            row.update(output=wrong, correct=False)
        rows.append(row)
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": ds["test"]})


def write_assets(target: Path, n_layer: int = 4, n_head: int = 4) -> None:
    """Write the byte-level tokenizer (256 bytes + ``<|endoftext|>``) and the tiny model config
    (``builtin:quickstart``: 4 layers x 128; ``builtin:quickstart-small``, the distillation
    demonstration's student: 2 layers x 128 with 2 heads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # order the 256 byte symbols by byte value, as GPT-2's bytes_to_unicode does
    byte_symbols = _bytes_to_unicode()
    assert set(byte_symbols.values()) == set(alphabet)
    vocab = {byte_symbols[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token=None, model_max_length=128, clean_up_tokenization_spaces=False)
    target.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(target))
    config = GPT2Config(vocab_size=257, n_positions=128, n_embd=128, n_layer=n_layer, n_head=n_head,
                        bos_token_id=256, eos_token_id=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config.save_pretrained(str(target))


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


if __name__ == "__main__":
    import sys

    if "--write-assets" in sys.argv:
        assets = Path(__file__).parent / "assets"
        write_assets(assets / "quickstart")
        write_assets(assets / "quickstart-small", n_layer=2, n_head=2)
        print(f"wrote {assets / 'quickstart'} and {assets / 'quickstart-small'}")
