"""The ``distill`` section of the config: learn a teacher's next-token distribution.

Kept beside :mod:`sftune.config.schema` (which includes it as ``Config.distill``); the
divergences, the live teacher and the saved top-k path are in :mod:`sftune.distill`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sftune.config.roles import Section


class DistillConfig(Section):
    teacher: str | None = None
    """The teacher: a model directory (or a training output directory, or a hub id) with the
    student's tokenizer. ``None``: no distillation (plain SFT). It runs frozen, without gradients,
    on the same packed batches as the student (the live path), unless ``distill.saved`` is set. Its
    vocabulary must be the student's (a teacher whose tokens map one to one onto the student's,
    in another order, is remapped; any other difference is refused). The live teacher goes through
    the start-up model check in the student's row layout (``model.check``; ``off`` skips): one
    whose outputs differ there is refused (``sftune distill-prepare`` and ``distill.saved`` take
    it). ``sftune distill-prepare`` always checks: the check decides whether the teacher's head is
    the plain linear layer or its own logits are needed."""

    saved: str | None = None
    """A directory written by ``sftune distill-prepare``: the teacher's top-k token ids and
    log-probabilities at every trained position of this run's data, read instead of running the
    teacher (the saved path). Needs ``distill.top_k`` equal to or below the saved k. With
    ``data.sources`` the rows are saved per source and found by each source's tokenized examples, so
    the mixture's weights, seed and epochs may change without preparing again. With
    ``data.streaming`` (prepared with it too) the rows are keyed by each example's file, row and part
    and checked against a hash of its tokens as it is looked up: any seed, weights or resume; rows for
    other data are refused at the first example that differs. ``columns``: the training data itself carries them
    (pre-tokenized rows in Axolotl's KD layout: ``target_token_ids``, ``target_logprobs``, optionally
    ``target_mask``, one row per input position; with ``data.sources``, every source)."""

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """The divergence between the teacher's distribution p and the student's q at each trained
    position: ``forward_kl`` KL(p || q) (mean-seeking; the classic distillation loss),
    ``reverse_kl`` KL(q || p) (mode-seeking), ``jsd`` the generalized Jensen-Shannon divergence
    with ``distill.beta``."""

    beta: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False)
    """The ``jsd`` interpolation, with TRL's (GKD's) semantics: with the mixture
    m = beta * p + (1 - beta) * q, jsd = beta * KL(p || m) + (1 - beta) * KL(q || m); beta = 0 is
    forward KL(p || q) and beta = 1 reverse KL(q || p), exactly (as TRL's ``generalized_jsd_loss``)."""

    temperature: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    """Both models' logits are divided by this before the divergence (not the cross-entropy); no
    T^2 factor (as TRL's GKD). Above 1 softens the teacher."""

    alpha: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """The weight of the divergence: the token loss is ``alpha * divergence + (1 - alpha) *
    cross-entropy`` on the data's tokens. 1: pure distillation; 0: plain SFT (the teacher is still
    run and logged)."""

    top_k: int | None = Field(None, ge=1)
    """Use only the teacher's k most likely tokens at each position (``None``: the full
    vocabulary). The saved path always uses top-k (at most the saved k). How the rest of the
    vocabulary is treated: ``distill.top_k_tail``."""

    top_k_tail: Literal["renormalise", "bucket"] = "renormalise"
    """With ``distill.top_k``: ``renormalise`` compares both distributions restricted to the
    teacher's k tokens, each renormalised over them; ``bucket`` keeps the rest of
    the vocabulary as one extra category holding its total probability (1 - the k tokens' mass) for
    each model: the student is also taught how much mass to leave outside the k. Both equal the full
    divergence when k is the vocabulary size. On saved log-probabilities ``bucket`` needs
    ``distill.temperature=1`` (the tail's mass at another temperature needs the tail's logits)."""

    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The teacher's weights: ``auto`` is bfloat16 on a GPU that supports it (else float16) and
    float32 on CPU. The divergence itself is always computed in float32 (float64 for float64 models)."""

    prepare_shard_size: int = Field(2048, ge=1)
    """``sftune distill-prepare``: examples per shard of the saved top-k (a rerun skips the shards
    already written)."""

    prepare_top_k: int = Field(64, ge=1)
    """``sftune distill-prepare``: how many of the teacher's most likely tokens to save per trained
    position (with their log-probabilities at temperature 1)."""

    on_policy: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    """On-policy distillation (GKD's ``lmbda``): the share of optimizer steps whose completions the
    student writes itself; the teacher scores the student's tokens. On such a step each example
    keeps its tokens before its last trained span as the prompt (earlier trained spans become
    untrained context), the student samples a completion (``distill.sample_temperature``, at most
    ``distill.max_new_tokens`` tokens, ending at the format's stop token), and only the generated
    tokens are trained. Which steps is a fixed function of ``train.seed`` and the step, so a resume
    is exact. 0: off (the data's completions only); 1: every step. Needs the live
    ``distill.teacher`` (saved rows are for the data's tokens) and ``distill.alpha=1`` (no
    cross-entropy on the student's own samples); generation is one example at a time."""

    max_new_tokens: int = Field(128, ge=1)
    """On-policy steps: the most tokens the student generates per example (also capped so prompt and
    completion fit ``data.max_length``)."""

    sample_temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)
    """On-policy steps: the temperature the student samples its completions at (separate from
    ``distill.temperature``, which is the loss's). 1: the student's own distribution; 0: greedy."""

    @model_validator(mode="after")
    def _on_policy_needs_a_live_teacher(self):
        if self.on_policy > 0 and self.saved:
            raise ValueError(f"distill.on_policy={self.on_policy} needs the live teacher: the saved rows of "
                             f"distill.saved={self.saved} score the data's tokens, not the student's generations; "
                             "unset distill.saved (keep distill.teacher) or set distill.on_policy=0")
        if self.on_policy > 0 and self.alpha < 1:
            raise ValueError(f"distill.on_policy={self.on_policy} needs distill.alpha=1 (got {self.alpha}): on an "
                             "on-policy step the cross-entropy term would train the student on its own samples "
                             "(GKD's objective is the divergence alone); set distill.alpha=1 or distill.on_policy=0")
        if self.on_policy > 0 and not self.teacher:
            raise ValueError(f"distill.on_policy={self.on_policy} needs distill.teacher (the model that scores the "
                             "student's generations)")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the run distils (a teacher or saved top-k is given)."""
        return bool(self.teacher or self.saved)
