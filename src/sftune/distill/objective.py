"""The distillation objective in a run: attached to the loss model, logged beside the loss.

:func:`attach` (called by :func:`sftune.training.setup`) checks the run can distil exactly, loads
the live teacher or reads the saved top-k (:mod:`sftune.distill.saved`), and sets a
:class:`Distiller` as the loss model's ``objective``: in training mode the fused loss then returns
``sum w * (alpha * divergence + (1 - alpha) * CE)`` over the loss positions
(:mod:`sftune.distill.divergence`); evaluation keeps the plain cross-entropy (eval loss and
perplexity stay comparable with plain SFT).

The loop's records get ``distill_loss`` (the divergence per loss token), ``ce_loss`` (the student's
cross-entropy on the data's tokens: on an on-policy step, the student's own), ``teacher_ce`` (the teacher's own cross-entropy on the same
tokens: the reference line; live teacher, or saved data with the target's log-probability) and
``teacher_s_per_step`` (time in the live teacher's body, per optimizer step); with ``distill.on_policy``
(:mod:`sftune.distill.on_policy`) also ``on_policy_steps`` (steps since the last record whose completions the
student wrote) and ``generated_len`` (their mean completion length). The first record also carries
``distill``: which teacher, how, its dtype and size (read by ``report.md``).
"""

from __future__ import annotations

import torch

from sftune.distill.divergence import Spec, TeacherChunk, distill_loss_sum
from sftune.distill.saved import KIND, attach_saved, source_sets  # registers the teacher kind's collator (data.extras)
from sftune.errors import ConfigError
from sftune.probe import probe_examples


def saved_rows(extras: dict, n: int):
    """``chunk(s, e)`` over a batch's saved teacher rows (``Batch.loss_extras`` of kind teacher)."""
    if "teacher_ids" not in extras:
        raise ConfigError("distillation from saved top-k, but this batch carries no teacher data: every training "
                          "example needs its saved rows (run sftune distill-prepare on this data)")
    ids, lp = extras["teacher_ids"], extras["teacher_logprobs"]
    valid, tlp = extras.get("teacher_valid"), extras.get("teacher_target_logprob")
    if ids.shape[0] != n:
        raise ConfigError(f"the saved teacher rows ({ids.shape[0]}) do not line up with the batch's {n} loss positions")

    def chunk(s: int, e: int) -> TeacherChunk:
        return TeacherChunk(ids=ids[s:e].long(), logprobs=lp[s:e], valid=None if valid is None else valid[s:e],
                            ce=None if tlp is None else -tlp[s:e])

    return chunk


class Distiller:
    """The loss model's ``objective`` (see the module docstring); keeps the logged sums."""

    def __init__(self, spec: Spec, teacher=None, described: dict | None = None, on_policy=None):
        self.spec, self.teacher, self.on_policy = spec, teacher, on_policy
        self.described = dict(described or {})
        self._pending = self._window = None
        self._told, self._steps = False, 0

    @torch.compiler.disable
    def __call__(self, lm, hidden, head, kw: dict) -> torch.Tensor:
        """The loss sum of the batch. Never traced by ``torch.compile`` (``train.compile``): the
        compiled student body hands its hidden states across a graph break to this eager code, so
        the teacher's timing, the logged sums and the chunked divergence's custom autograd run
        as they do without compile (and nothing here is a guard that would recompile)."""
        if hidden.shape[0] == 0:  # no loss position here (an empty micro-batch): nothing to ask the teacher
            teacher = None
        elif self.teacher is not None:
            teacher = self.teacher.rows(kw)
        else:
            teacher = saved_rows(kw["loss_extras"], hidden.shape[0])
        loss, stats = distill_loss_sum(hidden, head.weight, head.bias, kw["loss_targets"], teacher, self.spec,
                                       row_weights=kw["loss_weights"])
        weights = kw["loss_weights"]
        w = float(hidden.shape[0]) if weights is None else weights.double().sum()
        add = torch.cat([stats.double(), stats.new_zeros(1, dtype=torch.float64) + w])
        self._pending = add if self._pending is None else self._pending + add
        return loss

    def forget(self) -> None:
        """Drop the sums not yet logged (a rollback abandons the steps they came from)."""
        self._pending = self._window = None
        self._steps = 0
        if self.on_policy is not None:
            self.on_policy.forget()

    def step_end(self, skipped: bool) -> None:
        """A step ended: its sums join the log window, unless the step was skipped (NaN guard)."""
        if self._pending is not None and not skipped:
            self._window = self._pending if self._window is None else self._window + self._pending
        self._pending = None
        self._steps += 1
        if self.on_policy is not None:
            self.on_policy.step_end(skipped)

    def record(self, accelerator, world: int) -> dict:
        """The window's figures for a metrics record (reduced over ranks), then a fresh window."""
        device = accelerator.device
        stats = self._window if self._window is not None else torch.zeros(5, dtype=torch.float64, device=device)
        secs = self.teacher.take_seconds() if self.teacher is not None else 0.0
        steps, self._steps = max(self._steps, 1), 0
        made = self.on_policy.take() if self.on_policy is not None else []  # on-policy steps, examples, tokens
        stats = torch.cat([stats.to(device), torch.tensor([secs / steps, 1.0, *made], dtype=torch.float64,
                                                          device=device)])
        if world > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        self._window = None
        weight = float(stats[4].clamp(min=1e-12))
        out = {"distill_loss": float(stats[0]) / weight, "ce_loss": float(stats[1]) / weight}
        if float(stats[3]) > 0:
            out["teacher_ce"] = float(stats[2] / stats[3])
        if self.teacher is not None:
            out["teacher_s_per_step"] = round(float(stats[5] / stats[6]), 4)  # mean over ranks
        if made:  # every rank counts each on-policy step once
            out["on_policy_steps"] = int(round(float(stats[7] / stats[6])))
            if float(stats[8]) > 0:
                out["generated_len"] = round(float(stats[9] / stats[8]), 2)
        if not self._told:
            out["distill"], self._told = self.described, True
        return out


def attach(cfg, lm, tokenizer, data, device, console=None, sharded: bool = False) -> Distiller | None:
    """Set the run's distillation objective on ``lm`` (a :class:`~sftune.loss.CausalLMWithLoss`),
    or ``None`` when ``distill`` is off. Refuses what it cannot compute exactly (``sharded``: the
    run's engine is FSDP or DeepSpeed)."""
    d = cfg.distill
    if not d.enabled:
        return None
    if not lm.fused:
        raise ConfigError("distillation needs sftune's fused loss on the loss positions, and this model runs the "
                          "unfused one (its logits are transformed after the output layer, or the model check "
                          "fell back): this model cannot be a distillation student in sftune")
    spec = Spec.of(d)
    head_rows = lm.causal_lm.get_output_embeddings().weight.shape[0]
    if d.saved == "columns" and cfg.data.streaming:
        raise ConfigError("distill.saved=columns reads the teacher columns of in-memory data: data.streaming is not "
                          "supported with them yet (set data.streaming=false)")
    if d.saved == "columns":  # the dataset's own columns (Axolotl's KD layout, sftune.data.pretokenized)
        lacking = [label for label, part in source_sets(data) if KIND not in getattr(part, "extra_kinds", ())]
        if lacking:
            raise ConfigError(f"distill.saved=columns but the training data carries no teacher columns (source "
                              f"{', '.join(map(repr, lacking))}): give pre-tokenized rows with target_token_ids "
                              "and target_logprobs (Axolotl's KD layout)")
        if d.top_k_tail == "bucket" and d.temperature != 1:
            raise ConfigError("distill.top_k_tail=bucket on saved log-probabilities needs distill.temperature=1")
        described, teacher = {"teacher": d.teacher, "how": "saved", "saved": "the dataset's columns", "saved_k": "k"}, None
    elif d.saved:
        k, described = attach_saved(d.saved, data, tokenizer)
        if d.top_k is not None and d.top_k > k:
            raise ConfigError(f"distill.top_k={d.top_k} but {d.saved} holds the teacher's top {k} per position: "
                              f"set distill.top_k to at most {k}")
        if d.top_k_tail == "bucket" and d.temperature != 1:
            raise ConfigError("distill.top_k_tail=bucket on saved log-probabilities needs distill.temperature=1 (the "
                              "tail's mass at another temperature needs the teacher's full logits): use "
                              "top_k_tail=renormalise or the live teacher")
        spec = Spec(spec.loss, spec.beta, spec.temperature, spec.alpha, min(d.top_k or k, k), spec.tail)
        teacher = None
    else:
        from sftune.distill.teacher import load_teacher

        teacher = load_teacher(d.teacher, tokenizer, head_rows, device, d.teacher_dtype, lm.layout,
                               probe_examples(data.train), cfg.model.check)  # the student's probe examples
        if cfg.train.compile:  # its body on its own (the divergence stays eager: see Distiller.__call__)
            teacher.compile()
        described = teacher.describe()
    described.update(loss=d.loss, beta=d.beta, temperature=d.temperature, alpha=d.alpha, top_k=spec.top_k,
                     top_k_tail=d.top_k_tail if spec.top_k else None)
    if d.saved == "columns" and spec.top_k is None:
        described.update(top_k="all given", top_k_tail=d.top_k_tail)
    distiller = Distiller(spec, teacher, described, on_policy=on_policy(cfg, data, tokenizer, described, sharded))
    lm.objective = distiller
    if console is not None:
        console.print(describe_line(described), markup=False)
    return distiller


def on_policy(cfg, data, tokenizer, described: dict, sharded: bool = False):
    """The run's :class:`~sftune.distill.on_policy.OnPolicy` (None when ``distill.on_policy`` is 0),
    after refusing what it cannot do exactly (sharded engines, data with images)."""
    d = cfg.distill
    if d.on_policy <= 0:
        return None
    from sftune.distill.on_policy import OnPolicy, refuse_sharded

    refuse_sharded(sharded, False)  # at setup, before any step (also by the launch environment)
    if data.train.has_extras:
        raise ConfigError("distill.on_policy: the training data carries more than tokens (images): on-policy "
                          "generation is for text only; set distill.on_policy=0")
    described.update(on_policy=d.on_policy, max_new_tokens=d.max_new_tokens, sample_temperature=d.sample_temperature)
    stops = [f.stop_ids(tokenizer) for f in (data.formats or [data.fmt])]  # each source's own (by source index)
    return OnPolicy(d.on_policy, cfg.train.seed, d.max_new_tokens, d.sample_temperature, stops)


def describe_line(d: dict) -> str:
    """One line: what the run distils from and how (the console and report.md)."""
    loss = d["loss"] + (f" (beta {d['beta']})" if d["loss"] == "jsd" else "")
    vocab = f"top {d['top_k']}, {d['top_k_tail']}" if d.get("top_k") else "full vocabulary"
    check = d.get("check") or {}
    checked = (f", matches itself run alone in the {check['layout']} layout" if check.get("status") == "exact" else
               ", model check off" if check else "")
    how = (f"live, {d.get('dtype')}, {d.get('parameters', 0):,} parameters, {d.get('weights_mb')} MB{checked}"
           if d.get("how") == "live" else f"saved top-{d.get('saved_k')} from {d.get('saved')}")
    policy = (f"; on-policy {d['on_policy']} of the steps (the student samples at temperature "
              f"{d['sample_temperature']}, up to {d['max_new_tokens']} tokens)" if d.get("on_policy") else "")
    return (f"distillation: {loss} from {d.get('teacher') or 'a teacher'} ({how}); alpha {d['alpha']}, "
            f"temperature {d['temperature']}, {vocab}{policy}")


DISTILL_SERIES = (("divergence", "distill_loss"), ("student CE", "ce_loss"), ("teacher CE (reference)", "teacher_ce"))
"""The distillation figures of the metrics records, as plotted in report.md."""


def distill_lines(train: list[dict]) -> list[str]:
    """report.md's distillation section from the train records (empty for other runs)."""
    told = next((r["distill"] for r in train if "distill" in r), None)
    if told is None:
        return []
    last = train[-1]
    rows = [("teacher", describe_line(told).removeprefix("distillation: "))]
    rows += [(name, f"{last[key]:.4f} (last record)") for name, key in DISTILL_SERIES if key in last]
    secs = [r["teacher_s_per_step"] for r in train if "teacher_s_per_step" in r]
    if secs:
        rows.append(("teacher time", f"{sum(secs) / len(secs):.3f} s per optimizer step (mean over the records)"))
    steps = [r["on_policy_steps"] for r in train if "on_policy_steps" in r]
    if steps:
        lens = [r["generated_len"] for r in train if "generated_len" in r]
        mean = f", {sum(lens) / len(lens):.1f} tokens per completion (mean over the records)" if lens else ""
        rows.append(("on-policy", f"{sum(steps)} steps trained on the student's own completions{mean}"))
    if told.get("weights_mb") is not None:
        rows.append(("teacher memory", f"{told['weights_mb']} MB of weights ({told.get('dtype')}); its logits are "
                                       "made chunk by chunk (never [tokens, vocab])"))
    return ["## Distillation", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
