"""On-policy distillation: off is the data exactly; on, every trained token is the student's own
sample (its cached sampler equals a plain one, greedy equals ``generate``), the teacher scores exactly
those tokens (the float64 reference), the step choice is fixed by the seed, 1x8 == 4x2, resume is
bit-exact, and what cannot be made right is refused."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sftune.distill.on_policy import chosen, example_seed, prompt_end, refuse_sharded, rewrite, step_batches
from sftune.errors import ConfigError
from sftune.training import loop, setup, train

from conftest import build_model_dir, train_config
from distill_helpers import records, resumed_at_step_2
from test_distill_divergence import ref_div, ref_probs

pytestmark = pytest.mark.usefixtures("no_plots")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    return build_model_dir(tmp_path_factory.mktemp("teacher"), tiny_tokenizer, n_embd=48, n_layer=3)


def config(model_dir, data, out, teacher, **over):
    return train_config(model_dir, data, out, **{"distill.teacher": str(teacher), "train.max_steps": 2,
                                                 "data.max_length": 64, "distill.max_new_tokens": 12, **over})


def examples(batch) -> list[tuple[list[int], list[int]]]:
    """The batch's trained examples as (ids, targets), split where the positions restart, each up to
    its last trained token (every on-policy example ends with its completion)."""
    out = []
    for r in range(batch.input_ids.shape[0]):
        pos = batch.position_ids[r].tolist()
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            ids, tgt = batch.input_ids[r, a:b].tolist(), batch.targets[r, a:b].tolist()
            trained = [j for j, t in enumerate(tgt) if t != -100]
            if trained:  # up to the last trained token (a padded row's padding continues its last example)
                out.append((ids[:trained[-1] + 2], tgt[:trained[-1] + 2]))
    return out


def plain_sample(model, prompt, budget, stops, temperature, seed):
    """Sampling without a KV cache: the whole sequence again for every token."""
    gen = torch.Generator().manual_seed(seed)
    seq = list(prompt)
    for _ in range(budget):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].float()
        tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)) if temperature \
            else int(logits.argmax())
        seq.append(tok)
        if tok in stops:
            break
    return seq[len(prompt):]


def test_the_step_choice_is_a_function_of_seed_and_step():
    picks = [chosen(0.5, 42, s) for s in range(400)]
    assert picks == [chosen(0.5, 42, s) for s in range(400)] and 0.4 < sum(picks) / 400 < 0.6
    assert picks != [chosen(0.5, 43, s) for s in range(400)]
    assert not any(chosen(0.0, 42, s) for s in range(50)) and all(chosen(1.0, 42, s) for s in range(50))
    assert len({example_seed(42, 3, i) for i in range(100)} | {example_seed(42, 4, 0)}) == 101
    ig = -100
    assert prompt_end(np.array([5, ig, 7, 8, ig, ig, 3, 4, ig])) == (6, 8)  # the last span; earlier ones context
    assert prompt_end(np.array([5, 6, 7])) == (1, 3)  # all trained: the first token is the prompt
    assert prompt_end(np.array([5, ig, ig])) is None


def test_off_is_the_data_exactly(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    run = setup(config(tiny_model_dir, qa_rows_file, tmp_path / "off", teacher_dir,
                       **{"distill.on_policy": 0.0, "distill.max_new_tokens": 3}))
    assert run.distill.on_policy is None
    for step in (0, 1):
        for a, b in zip(step_batches(run, step), run.feed(step)):
            for f in dataclasses.fields(a):
                x, y = getattr(a, f.name), getattr(b, f.name)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_trained_token_is_the_students(temperature, tiny_model_dir, teacher_dir, qa_rows_file, tmp_path,
                                             tiny_tokenizer):
    """Labels are the student's sample (the cached sampler equals sampling the whole sequence again
    with the same seed; greedy equals transformers' generate), the prompt is untrained, and the
    step's loss weight counts the generated tokens."""
    run = setup(config(tiny_model_dir, qa_rows_file, tmp_path / "on", teacher_dir,
                       **{"distill.on_policy": 1.0, "distill.sample_temperature": temperature}))
    data, micro = run.feed.rows(0)
    batches = step_batches(run, 0)
    got = sorted(ex for mb in batches for ex in examples(mb))
    stops = set(run.data.fmt.stop_ids(tiny_tokenizer))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    want, generated = [], 0
    for i in (i for rows in micro for row in rows for i in row):
        ids, labels = data.example(i)
        start, _ = prompt_end(np.asarray(labels))
        prompt = [int(t) for t in ids[:start]]
        budget = min(12, 64 - start)  # data.max_length
        new = plain_sample(model, prompt, budget, stops, temperature, example_seed(run.cfg.train.seed, 0, i))
        if not temperature:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                                 eos_token_id=sorted(stops), pad_token_id=0)[0, len(prompt):].tolist()
            assert new == out[:len(new)] and (len(new) == budget or new[-1] in stops)
        want.append((prompt + new, [-100] * (start - 1) + new + [-100]))
        generated += len(new)
    assert got == sorted(want)
    assert sum(mb.w_loss for mb in batches) == generated == sum(mb.n_loss for mb in batches)
    assert [mb.real_tokens for mb in step_batches(run, 0)] == [mb.real_tokens for mb in batches]  # deterministic


def test_every_row_layout_holds_the_same_completions(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """The completions are collated in the run's layout (flat, rows, one example per row), the same
    examples and loss weight in each."""
    run = setup(config(tiny_model_dir, qa_rows_file, tmp_path / "lay", teacher_dir, **{"distill.on_policy": 1.0}))
    seen = {}
    for mode in ("flat", "rows", "per_example"):
        run.feed.plan = dataclasses.replace(run.feed.plan, mode=mode)
        batches = step_batches(run, 0)
        seen[mode] = (sorted(ex for mb in batches for ex in examples(mb)), sum(mb.w_loss for mb in batches))
        rows = [mb.input_ids.shape[0] for mb in batches]
        assert rows == [1] * len(batches) if mode == "flat" else sum(rows) > len(batches)
    assert seen["flat"] == seen["rows"] == seen["per_example"]


def test_the_teacher_scores_exactly_the_generated_tokens(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """A float64 student and teacher: the on-policy step's loss equals the reference divergence
    written from its definition on each generated sequence alone, and the loop logs it."""
    from sftune.distill.divergence import Spec

    over = {"distill.on_policy": 1.0, "distill.loss": "jsd", "distill.beta": 0.3, "distill.alpha": 1.0,
            "distill.temperature": 1.5, "distill.sample_temperature": 1.3, "train.max_steps": 1,
            "model.check": "off"}  # the probe's tolerance is for float32 models
    student = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    run = setup(config(tiny_model_dir, qa_rows_file, tmp_path / "ref", teacher_dir, **over), model=student)
    run.distill.teacher.lm.double()
    batches = step_batches(run, 0)
    spec = Spec("jsd", 0.3, 1.5, 1.0)
    s = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
    t = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float64)
    total = n = 0.0
    for ids, tgt in (ex for mb in batches for ex in examples(mb)):
        with torch.no_grad():
            zs, zt = s(torch.tensor([ids])).logits[0], t(torch.tensor([ids])).logits[0]
        keep = torch.tensor(tgt) != -100
        div = ref_div(*ref_probs(zs[keep], zt[keep], spec), spec)
        total, n = total + float(div.sum()), n + int(keep.sum())
    run.lm.train()
    with torch.no_grad():
        loss = sum(float(run.lm(**mb.inputs("cpu"))) for mb in batches) / sum(mb.w_loss for mb in batches)
    assert loss == pytest.approx(total / n, rel=1e-9)
    run.distill.forget()
    loop(run)
    run.logger.close()
    rec = records(tmp_path / "ref")[1]
    assert rec["loss"] == pytest.approx(total / n, rel=1e-9) and rec["on_policy_steps"] == 1
    assert rec["generated_len"] == pytest.approx(n / sum(len(examples(mb)) for mb in batches), abs=0.01)


@pytest.mark.parametrize("data", [{}, {"data.streaming": True}, {"data.packing": True}],
                         ids=["memory", "stream", "packed"])
def test_accumulation_is_exact(data, tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """1 x 8 == 4 x 2 with every step on-policy: each example is generated alone, so the same tokens."""
    over = {"distill.on_policy": 1.0, **data}
    a = train(config(tiny_model_dir, qa_rows_file, tmp_path / "a", teacher_dir, **over, **{"train.batch_size": 8}))
    b = train(config(tiny_model_dir, qa_rows_file, tmp_path / "b", teacher_dir, **over,
                     **{"train.batch_size": 2, "train.grad_accum": 4}))
    ra, rb = records(a.output_dir), records(b.output_dir)
    for step in (1, 2):
        assert ra[step]["generated_len"] == rb[step]["generated_len"] and ra[step]["loss_tokens"] == rb[step]["loss_tokens"]
        for key in ("loss", "distill_loss", "teacher_ce"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-5), (step, key)  # fp32 sums in another order (threads vary with load)


def test_lora_student_samples_as_the_full_student(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """LoRA's B starts at 0: the same completions and the same step-1 loss as the full student."""
    over = {"distill.on_policy": 1.0, "train.max_steps": 1}
    full = records(train(config(tiny_model_dir, qa_rows_file, tmp_path / "full", teacher_dir, **over)).output_dir)
    lora = records(train(config(tiny_model_dir, qa_rows_file, tmp_path / "lora", teacher_dir, **over,
                                **{"lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})).output_dir)
    assert lora[1]["generated_len"] == full[1]["generated_len"]
    assert lora[1]["loss"] == pytest.approx(full[1]["loss"], rel=1e-5)


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """2 ranks x 2 x 2 == 1 process x 4 x 2: each rank generates its own examples, seeded by their index."""
    from test_distributed import overrides, torchrun

    spec = {"distill.teacher": str(teacher_dir), "distill.on_policy": 1.0, "distill.max_new_tokens": 12,
            "train.max_steps": 2, "data.max_length": 64, "train.grad_accum": 2, "train.max_grad_norm": 1e9}
    train(train_config(tiny_model_dir, qa_rows_file, tmp_path / "one", **spec, **{"train.batch_size": 4}))
    torchrun(overrides(tiny_model_dir, qa_rows_file, tmp_path / "two", **spec, **{"train.batch_size": 2}))
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    for step in (1, 2):
        assert a[step]["generated_len"] == b[step]["generated_len"] and a[step]["on_policy_steps"] == 1
        for key in ("loss", "distill_loss", "teacher_ce"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5), (step, key)


def test_resume_is_bit_exact(dropout_model_dir, teacher_dir, qa_rows_file, tmp_path):
    over = {"train.max_steps": 4, "train.save_every": 2, "train.keep_checkpoints": 5, "train.batch_size": 4,
            "distill.on_policy": 0.5, "train.seed": 7}
    assert [chosen(0.5, 7, s) for s in range(4)] == [True, False, True, False]  # both kinds after the cut
    full, resumed = resumed_at_step_2(
        lambda out, **more: config(dropout_model_dir, qa_rows_file, out, teacher_dir, **over, **more), tmp_path)
    assert [full[s]["on_policy_steps"] for s in (1, 2, 3, 4)] == [1, 0, 1, 0]
    for step in (3, 4):
        assert resumed[step]["loss"] == full[step]["loss"] and resumed[step].get("generated_len") == \
            full[step].get("generated_len")
    from sftune.run_report import build_report

    report = build_report(tmp_path / "cut").read_text()
    assert "| on-policy | 2 steps trained on the student's own completions" in report


class Rows:
    """An example set of given (ids, labels, weights, extras)."""

    def __init__(self, *examples):
        self.items = examples
        self.weighted = any(e[2] is not None for e in examples)
        self.has_extras = any(e[3] for e in examples)
        self.rows, self.source = np.arange(len(examples)), np.zeros(len(examples), dtype=np.int64)

    def example(self, i):
        return np.asarray(self.items[i][0]), np.asarray(self.items[i][1])

    def example_weights(self, i):
        return np.asarray(self.items[i][2], dtype=np.float32)

    def extras(self, i):
        return self.items[i][3]


def test_weights_carry_over_or_are_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ig, kw = -100, dict(seed=0, max_new=4, max_length=64, temperature=1.0, stops=set())
    data = Rows(([5, 6, 7, 8, 9, 10], [ig, 6, ig, ig, 9, 10], [0, 1, 0, 0, 2.5, 2.5], {}),
                ([5, 6, 7, 8], [ig, ig, 7, 8], [0, 0, 1, 3], {}),
                ([5, 6, 7], [ig, 6, 7], [0, 1, 1], {"image": [1]}))
    ex, n = rewrite(model, data, 0, 0, **kw)
    assert n == 4 and list(ex.ids[:4]) == [5, 6, 7, 8] and list(ex.labels[:4]) == [ig] * 4
    assert list(ex.weights) == [0, 0, 0, 0, 2.5, 2.5, 2.5, 2.5] and list(ex.labels[4:]) == list(ex.ids[4:])
    with pytest.raises(ConfigError, match="several loss weights"):
        rewrite(model, data, 1, 0, **kw)
    with pytest.raises(ConfigError, match="text only"):
        rewrite(model, data, 2, 0, **kw)


def test_refusals(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs the live teacher"):
        config(tiny_model_dir, qa_rows_file, tmp_path, teacher_dir, **{"distill.on_policy": 0.5,
                                                                        "distill.saved": str(tmp_path)})
    with pytest.raises(ConfigError, match="needs distill.alpha=1"):
        config(tiny_model_dir, qa_rows_file, tmp_path, teacher_dir, **{"distill.on_policy": 0.5, "distill.alpha": 0.5})
    with pytest.raises(ConfigError, match="needs distill.teacher"):
        train_config(tiny_model_dir, qa_rows_file, tmp_path, **{"distill.on_policy": 1})
    with pytest.raises(ConfigError, match="FSDP or DeepSpeed"):
        refuse_sharded(True, False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="FSDP or DeepSpeed"):
        refuse_sharded(False, False)
    from sftune.distill.objective import on_policy

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    cfg = config(tiny_model_dir, qa_rows_file, tmp_path, teacher_dir, **{"distill.on_policy": 1})
    with pytest.raises(ConfigError, match="images"):
        on_policy(cfg, SimpleNamespace(train=SimpleNamespace(has_extras=True)), None, {})
    with pytest.raises(ConfigError, match="FSDP or DeepSpeed"):  # the engine, told at setup: before any step
        on_policy(cfg, SimpleNamespace(train=SimpleNamespace(has_extras=False)), None, {}, sharded=True)


def test_each_source_stops_at_its_own_formats_stop_tokens(tiny_model_dir, teacher_dir, qa_rows_file, tmp_path):
    """A mixture's examples end their completions at their own source's stop tokens, not the first's."""
    from sftune.distill.objective import on_policy

    cfg = config(tiny_model_dir, qa_rows_file, tmp_path, teacher_dir, **{"distill.on_policy": 1})
    fmt = lambda *ids: SimpleNamespace(stop_ids=lambda tok: list(ids))  # noqa: E731
    data = SimpleNamespace(train=SimpleNamespace(has_extras=False), fmt=fmt(1), formats=[fmt(1), fmt(2, 3)])
    assert on_policy(cfg, data, None, {}).stops == [{1}, {2, 3}]
    assert on_policy(cfg, SimpleNamespace(train=data.train, fmt=fmt(5), formats=[]), None, {}).stops == [{5}]
