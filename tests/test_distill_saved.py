"""The saved path: sftune distill-prepare (sharded, resumable), training from the saved top-k equals the
live teacher on the same data, the seam's collator, and the refusals (other data, incomplete, k)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sftune.cli import main
from sftune.data.extras import Placed
from sftune.data.packing import collate
from sftune.distill.saved import collate_teacher
from sftune.errors import ConfigError
from sftune.training import train

from conftest import build_model_dir, train_config
from distill_helpers import prepare_saved, records

pytestmark = pytest.mark.usefixtures("no_plots")

BASE = {"data.max_length": 64, "data.limit": 16, "train.max_steps": 2, "train.batch_size": 4}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


@pytest.fixture(scope="module")
def saved_dir(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path_factory):
    """The CLI on a recipe file (this run's config): the teacher's top 400 (= the vocabulary), 5 per shard."""
    return prepare_saved(tmp_path_factory, "saved", tiny_model_dir, qa_rows_file,
                         {**BASE, "distill.teacher": str(teacher_dir)})


def test_prepare_is_sharded_and_resumable(saved_dir, capsys):
    out, args = saved_dir
    manifest = json.loads((out / "manifest.json").read_text())
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert manifest["k"] == 400 and len(shards) == -(-manifest["examples"] // 5)
    shutil.rmtree(out / "shards" / shards[-1])
    before = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished shards were skipped
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards


@pytest.mark.parametrize("spec", [{"distill.loss": "jsd", "distill.beta": 0.5, "distill.alpha": 0.7},
                                  {"distill.loss": "reverse_kl", "distill.top_k": 12, "distill.temperature": 2.0},
                                  {"distill.top_k": 12, "distill.top_k_tail": "bucket"}], ids=str)
def test_saved_equals_live(spec, saved_dir, tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """Full vocabulary saved (k = vocab) == live full; equal k live == saved, both tails."""
    out, _ = saved_dir
    live = tmp_path / "live"
    train(train_config(tiny_model_dir, qa_rows_file, live, **BASE, **spec, **{"distill.teacher": str(teacher_dir)}))
    saved = tmp_path / "saved"
    train(train_config(tiny_model_dir, qa_rows_file, saved, **BASE, **spec, **{"distill.saved": str(out)}))
    a, b = records(live), records(saved)
    for step in (1, 2):
        for key in ("loss", "distill_loss", "ce_loss", "teacher_ce"):
            # fp32: saved log-probabilities vs logits differ by rounding; the KL of two near-uniform random
            # models is ~1e-3, so its rounding shows at 1e-5 relative: an absolute floor of 1e-7
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert b[1]["distill"]["how"] == "saved" and a[1]["distill"]["how"] == "live"


def test_refusals(saved_dir, tiny_model_dir, qa_rows_file, tmp_path):
    out, _ = saved_dir
    with pytest.raises(ConfigError, match="other data"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "a", **{**BASE, "data.limit": 12},
                           **{"distill.saved": str(out)}))
    with pytest.raises(ConfigError, match="at most 400"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "b", **BASE,
                           **{"distill.saved": str(out), "distill.top_k": 500}))
    with pytest.raises(ConfigError, match="temperature=1"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "c", **BASE,
                           **{"distill.saved": str(out), "distill.top_k_tail": "bucket", "distill.temperature": 2.0,
                              "distill.top_k": 5}))
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(next((partial / "shards").iterdir()))
    with pytest.raises(ConfigError, match="incomplete"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "d", **BASE, **{"distill.saved": str(partial)}))


def test_collator_follows_loss_index_and_bucket_padding():
    """Payload rows land in loss_index order; bucketed loss slots get zero rows; a miscount is refused."""
    a = ([1, 2, 3, 4], [-100, -100, 3, 4])  # 2 loss positions
    b = ([5, 6, 7], [-100, 6, 7])  # 2 loss positions
    pa_ = {"ids": [[3, 9], [4, 8]], "logprobs": [[-0.1, -2.0], [-0.2, -3.0]], "target": [-0.1, -0.2]}
    pb = {"ids": [[6, 1], [7, 2]], "logprobs": [[-0.3, -1.0], [-0.4, -1.5]], "target": [-0.3, -0.4]}
    batch = collate([[(*a, None, {"teacher": pa_}), (*b, None, {"teacher": pb})]], pad_id=0, bucket=8)
    ex = batch.loss_extras
    assert ex["teacher_ids"].shape == (len(batch.loss_index), 2) and batch.n_loss == 4
    assert ex["teacher_ids"][:4, 0].tolist() == batch.loss_targets[:4].tolist()  # the rows follow loss_index
    assert ex["teacher_target_logprob"][:4].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    with pytest.raises(ConfigError, match="do not match"):
        collate([[(*a, None, {"teacher": pa_}), (*b, None, {})]], pad_id=0)
    assert torch.equal(ex["teacher_ids"][4:], torch.zeros(len(batch.loss_index) - 4, 2, dtype=torch.long))


def test_collator_direct_placed():
    batch = collate([[([1, 2, 3], [-100, 2, 3])]], pad_id=0)
    collate_teacher([Placed(0, 0, 3, {"ids": [[2], [3]], "logprobs": [[0.0], [0.0]], "valid": [[1], [0]]})], batch)
    assert batch.loss_extras["teacher_valid"].tolist() == [[True], [False]]
    assert "teacher_target_logprob" not in batch.loss_extras


def axolotl_rows(teacher_dir, k: int) -> list[dict]:
    """Pre-tokenized rows in Axolotl's KD layout, from the teacher: row p is its top-k for the token at p."""
    import random

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    rng, out = random.Random(1), []
    for _ in range(8):
        n, prompt = rng.randint(12, 30), rng.randint(2, 6)
        ids = [rng.randrange(1, 400) for _ in range(n)]
        with torch.no_grad():
            top = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).topk(k, -1)
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt),
                    "target_token_ids": [list(range(k))] + top.indices[:-1].tolist(),
                    "target_logprobs": [[0.0] * k] + top.values[:-1].tolist(),
                    "target_mask": [[0] * k] + [[1] * k] * (n - 1)})
    return out


@pytest.mark.parametrize("spec", [{"distill.loss": "forward_kl"}, {"distill.loss": "jsd", "distill.top_k": 10}],
                         ids=str)
def test_axolotl_columns_load_as_they_are(spec, tiny_model_dir, teacher_dir, tmp_path):
    """A dataset carrying the teacher's top-k in Axolotl's columns trains as the live teacher does."""
    from datasets import Dataset

    from sftune.config import load_config
    from sftune.data.pretokenized import PretokenizedFormat
    from sftune.data.sources import Source, with_row_index

    ds = Dataset.from_list(axolotl_rows(teacher_dir, 400))
    base = {"model.path": str(tiny_model_dir), "train.max_steps": 2, "train.batch_size": 4, "train.log_every": 1,
            "data.max_length": 64, **spec}
    got = {}
    for how, extra in (("live", {"distill.teacher": str(teacher_dir)}), ("columns", {"distill.saved": "columns"})):
        cfg = load_config(None, {**base, **extra, "train.output_dir": str(tmp_path / how)})
        train(cfg, source=Source(train=with_row_index(ds), eval=None, name="rows", rows_read=len(ds)),
              fmt=PretokenizedFormat(completion_only=True))
        got[how] = records(tmp_path / how)
    for step in (1, 2):
        for key in ("loss", "distill_loss", "ce_loss"):
            assert got["columns"][step][key] == pytest.approx(got["live"][step][key], rel=1e-5, abs=1e-7), (step, key)
    assert "teacher_ce" not in got["columns"][1]  # the layout has no target log-probability


def test_axolotl_rows_from_a_file(tiny_model_dir, teacher_dir, tmp_path):
    """``sftune train`` on a JSONL of Axolotl KD rows: pre-tokenized rows are recognised by their
    input_ids (completion_mask honoured) and the teacher columns ride along."""
    from sftune.config import load_config

    data = tmp_path / "kd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in axolotl_rows(teacher_dir, 16)))
    cfg = load_config(None, {"model.path": str(tiny_model_dir), "data.path": str(data), "train.max_steps": 1,
                             "train.batch_size": 8, "train.log_every": 1, "data.max_length": 64,
                             "distill.saved": "columns", "train.output_dir": str(tmp_path / "out")})
    train(cfg)
    rec = records(tmp_path / "out")[1]
    assert rec["distill_loss"] > 0 and rec["distill"]["saved"] == "the dataset's columns"


def test_a_teacher_refused_live_is_prepared_exactly(tiny_model_dir, qa_rows_file, tiny_tokenizer, tmp_path):
    """A RoBERTa-style teacher (it numbers positions itself, and its head transforms the body's output):
    the live run refuses it, naming distill-prepare; distill-prepare runs it one example per row,
    padded, as plain transformers does, so its saved top-k equal the model's own log-probabilities
    on each example alone; training reads them."""
    import datasets
    from transformers import AutoModelForCausalLM

    from sftune.data.chain import prepare
    from sftune.distill.saved import prepare_saved
    from test_distill_teacher import roberta_dir

    teacher = roberta_dir(tmp_path / "roberta", tiny_tokenizer)
    over = {**BASE, "data.limit": 8, "distill.teacher": str(teacher), "distill.prepare_top_k": 8}
    with pytest.raises(ConfigError, match="student's flat layout.*distill-prepare"):
        train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "live", **over))
    cfg = train_config(tiny_model_dir, qa_rows_file, tmp_path / "unused", **over)
    out = tmp_path / "saved"
    prepare_saved(cfg, str(out))
    saved = datasets.concatenate_datasets([datasets.load_from_disk(str(p))
                                           for p in sorted((out / "shards").iterdir())])
    train_set = prepare(cfg.data, tiny_tokenizer, 64, seed=cfg.train.seed).train
    plain = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float64).eval()
    for i in range(len(train_set)):
        ids, labels = train_set.example(i)
        with torch.no_grad():
            logits = plain(torch.tensor([list(ids)])).logits[0, :-1]
        keep = torch.tensor(list(labels[1:])) != -100
        top = torch.log_softmax(logits[keep], -1).topk(8, -1)
        row = saved[i]
        assert torch.equal(torch.tensor(row["ids"]), top.indices), i
        torch.testing.assert_close(torch.tensor(row["logprobs"], dtype=torch.float64), top.values, rtol=0, atol=1e-5)
    over.pop("distill.teacher")
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "s", **over, **{"distill.saved": str(out)}))
    r = records(tmp_path / "s")
    assert r[1]["distill"]["how"] == "saved" and r[2]["distill_loss"] > 0 and r[2]["teacher_ce"] > 0


def test_prepare_refuses_examples_with_images(tiny_model_dir, qa_rows_file, tmp_path, monkeypatch):
    """In-memory data whose examples carry images (or any kind but the teacher's) cannot get a text
    teacher's rows: refused before the teacher loads, naming the source and example."""
    import types

    import numpy as np

    import sftune.data.chain as chain
    from sftune.distill.saved import prepare_saved

    class Pics:  # a tokenized set whose example 1 carries an image
        has_extras, rows = True, np.array([4, 7])

        def __len__(self):
            return 2

        def extras(self, i):
            return {"images": ["a.png"]} if i else {}

    data = types.SimpleNamespace(train=Pics(), stream=None, report=types.SimpleNamespace(source="pics"))
    monkeypatch.setattr(chain, "prepare", lambda *a, **kw: data)
    cfg = train_config(tiny_model_dir, qa_rows_file, tmp_path / "unused", **BASE,
                       **{"distill.teacher": str(tmp_path / "no-teacher")})
    with pytest.raises(ConfigError, match=r"source 'pics', example 1 \(row 7\) carries images beside its tokens"):
        prepare_saved(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
