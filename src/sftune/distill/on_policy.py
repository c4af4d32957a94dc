"""On-policy distillation (GKD's ``lmbda``): on a share of the steps the student writes the completions.

:func:`step_batches` is the training loop's one call for a step's micro-batches. On an off-policy
step it returns the data's (``run.feed(step)``); on an on-policy step (:func:`chosen`: a fixed
function of ``train.seed`` and the step, the same on every rank, so a resume needs no new state) it
takes the same examples (``run.feed.rows(step)``) and rewrites each one:

* the prompt is the example's tokens before its last trained span (earlier trained spans become
  untrained context; at least the first token, which is never a target);
* the student, in eval mode and without gradients, samples a completion one token at a time with a
  KV cache (:func:`sample`): softmax of its logits at ``distill.sample_temperature`` (0: greedy),
  drawn by a CPU ``torch.Generator`` seeded from (seed, step, example index), at most
  ``distill.max_new_tokens`` tokens and no further than ``data.max_length``, ending at its source's format's
  stop token (kept and trained, as TRL's GKD keeps the first EOS);
* the generated tokens are the trained labels (each with the weight of the span it replaces, when
  messages carry weights), and the examples are collated again in the run's row layout
  (:class:`~sftune.data.packing.BatchPlan`), so ``w_loss`` and the step's normaliser count the
  generated tokens and the live teacher scores exactly them.

Each example is generated alone (a batch of one), and nothing touches the global RNG, so the tokens
depend neither on how the step is split into micro-batches and ranks nor on anything but the
student's weights, the seed and the step: ``1 x 8 == 4 x 2`` and a resume stay exact. The cost is
up to ``max_new_tokens`` sequential student forwards per example on an on-policy step.

Refused: sharded models (FSDP, DeepSpeed: generation needs whole parameters on each rank),
examples with extras (images), and weighted messages whose last trained span has several weights.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import torch

from sftune.data.examples import ExampleList, StreamExample
from sftune.data.packing import BatchPlan
from sftune.data.tokenize import IGNORE
from sftune.errors import ConfigError

TAG = 0x6F6E706F
"""Mixed into every seed here, so the step choice and the samples share no stream with other RNG uses."""


def chosen(share: float, seed: int, step: int) -> bool:
    """Whether optimizer step ``step`` (0-based) is on-policy: a draw below ``share`` from an RNG
    seeded by (seed, step). The same on every rank and on every rerun."""
    if share <= 0:
        return False
    return share >= 1 or bool(np.random.default_rng([TAG, seed, step]).random() < share)


def example_seed(seed: int, step: int, index: int) -> int:
    """The seed of example ``index``'s sampler at step ``step``."""
    return int(np.random.SeedSequence([TAG, seed, step, index]).generate_state(1, np.uint64)[0])


def prompt_end(labels: np.ndarray) -> tuple[int, int] | None:
    """``(start, end)`` of the last trained span of ``labels`` (``start`` at least 1: the first
    token is never a target), or None when no token after the first is trained."""
    trained = np.flatnonzero(labels[1:] != IGNORE) + 1
    if not len(trained):
        return None
    end = int(trained[-1]) + 1
    start = end - 1
    while start > 1 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


@torch.no_grad()
def sample(model, prompt, budget: int, stops, temperature: float, generator: torch.Generator | None) -> list[int]:
    """The student's completion of ``prompt`` (a list of ids): up to ``budget`` tokens, sampled at
    ``temperature`` with ``generator`` (greedy at 0), ending with the first stop token."""
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    name = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    ids, past, out = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=device)[None], None, []
    for _ in range(budget):
        res = model(input_ids=ids, use_cache=True, **keep, **({name: past} if past is not None else {}))
        past, logits = getattr(res, name, None), res.logits[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1).cpu()
            tok = int(torch.multinomial(probs, 1, generator=generator))
        else:
            tok = int(logits.argmax())
        out.append(tok)
        if tok in stops:
            break
        ids = torch.tensor([[tok]], dtype=torch.long, device=device)
    return out


def rewrite(model, data, i: int, step: int, *, seed: int, max_new: int, max_length: int, temperature: float,
            stops: set[int]) -> tuple[StreamExample, int | None]:
    """Example ``i`` of ``data`` with the student's completion as its trained tokens, and how many
    tokens were generated (None: the example trains nothing and is kept as it is)."""
    ids, labels = (np.asarray(x) for x in data.example(i))
    weights = data.example_weights(i).astype(np.float32) if data.weighted else None
    if data.has_extras and data.extras(i):
        raise ConfigError(f"distill.on_policy: example {i} (row {int(data.rows[i])} of source {int(data.source[i])}) "
                          f"carries data beside its tokens ({', '.join(data.extras(i))}: images?); on-policy "
                          "generation is for text only: set distill.on_policy=0")
    span = prompt_end(labels)
    if span is None:  # nothing trained: nothing to replace (it adds no loss either way)
        return StreamExample(ids, labels, weights, int(data.source[i]), int(data.rows[i])), None
    start, end = span
    if weights is not None:
        carried = np.unique(weights[start:end][labels[start:end] != IGNORE])
        if len(carried) > 1:
            raise ConfigError(f"distill.on_policy: example {i} (row {int(data.rows[i])} of source "
                              f"{int(data.source[i])}) has several loss weights in its last trained span "
                              f"({', '.join(f'{w:g}' for w in carried[:4])}); the student's completion can carry only "
                              "one: give that message a single weight, or set distill.on_policy=0")
    gen = None
    if temperature > 0:
        gen = torch.Generator().manual_seed(example_seed(seed, step, i))
    new = sample(model, ids[:start].tolist(), max(0, min(max_new, max_length - start)), stops, temperature, gen)
    new_ids = np.concatenate([ids[:start], np.asarray(new, dtype=ids.dtype)])
    new_labels = np.concatenate([np.full(start, IGNORE, dtype=labels.dtype), np.asarray(new, dtype=labels.dtype)])
    if weights is not None:
        weights = np.concatenate([np.zeros(start, np.float32), np.full(len(new), carried[0], np.float32)])
    return StreamExample(new_ids, new_labels, weights, int(data.source[i]), int(data.rows[i])), len(new)


def refuse_sharded(sharded: bool, deepspeed: bool) -> None:
    """On-policy generation runs the whole student on each rank: sharded engines are refused."""
    if sharded or deepspeed or any(os.environ.get(f"ACCELERATE_USE_{k}", "false").lower() == "true"
                                   for k in ("FSDP", "DEEPSPEED")):
        raise ConfigError("distill.on_policy is not supported under FSDP or DeepSpeed (the student generates with "
                          "its whole parameters on each rank): launch with DDP (configs/accelerate/ddp.yaml) or "
                          "set distill.on_policy=0")


class OnPolicy:
    """The on-policy part of a distillation run: which steps, their batches, and the logged counts
    (on-policy steps, generated examples and tokens) of the steps not yet logged."""

    def __init__(self, share: float, seed: int, max_new: int, temperature: float, stops: list):
        self.share, self.seed, self.max_new, self.temperature = share, seed, max_new, temperature
        self.stops = [set(int(s) for s in ids) for ids in stops]
        """Each source's stop tokens (its format's), by source index."""
        self._pending = self._window = None

    def chosen(self, step: int) -> bool:
        return chosen(self.share, self.seed, step)

    def batches(self, run, step: int) -> list:
        """Step ``step``'s micro-batches with the student's completions (see the module docstring);
        sharded engines were refused at setup (:func:`refuse_sharded`)."""
        data, micro = run.feed.rows(step)
        plan: BatchPlan = run.feed.plan
        model = run.model()
        order = [i for rows in micro for row in rows for i in row]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with run.accelerator.autocast():
                made = [rewrite(model, data, i, step, seed=self.seed, max_new=self.max_new,
                                max_length=plan.max_length, temperature=self.temperature,
                                stops=self.stops[int(data.source[i])])
                        for i in order]
        finally:
            for m, mode in modes:
                m.training = mode
        local = ExampleList([ex for ex, _ in made])  # weighted like data: rewrite keeps weights of a weighted set
        layout = BatchPlan(local.lengths, [[j] for j in range(len(made))], 1, 1, plan.max_length, plan.seed, False,
                           plan.mode, plan.attn_weight, plan.bucket)
        out, j = [], 0
        for rows in micro:
            k = sum(len(r) for r in rows)
            out.append(layout.collate_rows(layout.layout(list(range(j, j + k))), local, run.feed.batches.pad_id))
            j += k
        counts = [n for _, n in made if n is not None]
        self._pending = [1.0, float(len(counts)), float(sum(counts))]
        return out

    def step_end(self, skipped: bool) -> None:
        """A step ended: its counts join the log window unless it was skipped."""
        if self._pending is not None and not skipped:
            self._window = self._pending if self._window is None else [a + b for a, b in
                                                                       zip(self._window, self._pending)]
        self._pending = None

    def take(self) -> list[float]:
        """``[on-policy steps, generated examples, generated tokens]`` since the last call (this rank)."""
        out, self._window = self._window or [0.0, 0.0, 0.0], None
        return out

    def forget_step(self) -> None:
        self._pending = None

    def forget(self) -> None:
        self._pending = self._window = None


def step_batches(run, step: int) -> list:
    """This rank's micro-batches of step ``step``: the data's, or on an on-policy step the student's
    completions (:class:`OnPolicy`)."""
    on_policy = getattr(run.distill, "on_policy", None)
    if on_policy is None or not on_policy.chosen(step):
        if on_policy is not None:
            on_policy.forget_step()  # an interrupted on-policy step's counts
        return run.feed(step)
    return on_policy.batches(run, step)
