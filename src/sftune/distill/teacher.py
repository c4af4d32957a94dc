"""The teacher: loaded frozen, checked against the student's vocabulary, run on the student's batches.

:func:`load_teacher` loads a model directory (a training output directory, a LoRA adapter
directory: merged, or a hub id) in ``distill.teacher_dtype``, frozen (no gradients, eval mode), and
wraps it in :class:`~sftune.loss.CausalLMWithLoss` for its body call, so it sees a packed batch
exactly as the student does (same ``input_ids``, ``position_ids``, per-example attention).
:func:`check_teacher` holds it to that: the student's start-up probe (:mod:`sftune.probe`) run on the
teacher in the student's layout, on the same few examples of the run; a teacher whose outputs
differ there (a family that numbers positions its own way) is refused, never used silently wrong.
``sftune distill-prepare`` runs the teacher one example per row, padded, without ``position_ids``
(the ``padded`` candidate of the probe), which such families pass.

:func:`vocab_map` is the vocabulary rule: the same tokens with the same ids, or the same tokens in
another order (remapped by a permutation of the teacher's logits); anything else is refused.

:class:`LiveTeacher` runs the body without gradients and keeps only its hidden states at the loss
positions; its logits are made chunk by chunk from them by the divergence
(:mod:`sftune.distill.divergence`), never ``[tokens, vocab]`` at once.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sftune.attention import enable_varlen
from sftune.capabilities import body_of, capabilities
from sftune.distill.divergence import TeacherChunk
from sftune.errors import ConfigError
from sftune.loss import CausalLMWithLoss
from sftune.model import count_parameters, fast_activations, load_pretrained, resolve_path
from sftune.probe import PADDED, compare, format_diffs


def teacher_dtype(name: str, device: torch.device) -> str:
    """``distill.teacher_dtype``: ``auto`` is bfloat16 (float16 without bf16 support) on a GPU and
    float32 on CPU."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def vocab_map(student_tok, teacher_tok, student_rows: int, teacher_rows: int) -> torch.Tensor | None:
    """``None`` when the teacher's logits line up with the student's; a permutation (the teacher's
    id of each student id) when the same tokens have other ids; a clear error otherwise."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        if student_rows != teacher_rows:
            raise ConfigError(f"distill.teacher: the teacher's output layer has {teacher_rows} rows and the student's "
                              f"{student_rows}, with the same tokenizer ({len(sv)} tokens); the two distributions "
                              "are over different sets. Use a teacher and student with the same vocabulary size")
        return None
    only_s, only_t = sorted(set(sv) - set(tv)), sorted(set(tv) - set(sv))
    if only_s or only_t:
        raise ConfigError(
            f"distill.teacher has another vocabulary: {len(only_s)} of the student's {len(sv)} tokens are not the "
            f"teacher's (e.g. {only_s[:3]}) and {len(only_t)} of the teacher's are not the student's (e.g. "
            f"{only_t[:3]}); distillation needs one token set (a teacher trained with another data.chat_template "
            "adds tokens: train both with the same one)")
    if not (student_rows == teacher_rows == len(sv)):
        raise ConfigError(f"distill.teacher: the same {len(sv)} tokens in another order, but output layers of "
                          f"{student_rows} (student) and {teacher_rows} (teacher) rows: cannot be remapped")
    return torch.tensor([tv[tok] for tok, _ in sorted(sv.items(), key=lambda kv: kv[1])], dtype=torch.long)


def load_teacher(path: str, student_tokenizer, student_rows: int, device: torch.device, dtype: str = "auto",
                 layout: str | None = None, examples=(), check: str = "auto") -> "LiveTeacher":
    """The frozen teacher on ``device``, ready to run on the student's batches (``layout``: theirs, or
    ``padded``: ``sftune distill-prepare``'s), checked on ``examples`` by :func:`check_teacher`."""
    path = resolve_path(path)
    name = teacher_dtype(dtype, device)
    model, tok = load_pretrained(path, dtype=name)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter directory: the teacher is base + adapter
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    fast_activations(model)
    model.to(device)
    if layout == "flat" and not enable_varlen(model):  # per-example attention from doc_bounds
        raise ConfigError(f"distill.teacher '{path}' cannot attend per example within the student's flat rows "
                          "(its attention implementation takes no custom kernel): give it sdpa or eager attention "
                          "in its config.json, or run it once with sftune distill-prepare and train with distill.saved")
    if layout in ("rows", "per_example") and layout not in capabilities(model).layouts:
        raise ConfigError(f"distill.teacher '{path}' cannot run exactly in the student's {layout} layout (its "
                          f"capabilities: {', '.join(capabilities(model).layouts)}): choose a teacher of a family "
                          "that can, or use distill-prepare and distill.saved")
    lm = CausalLMWithLoss(model, fused=True, layout=layout).eval()
    if not lm.fused and layout != PADDED:
        raise ConfigError(f"distill.teacher '{path}' transforms its logits after the output layer (softcapping or "
                          "scaling) or has no plain linear head: sftune's chunked live distillation needs a linear "
                          "head; run it once with sftune distill-prepare (its own logits) and train with distill.saved")
    perm = vocab_map(student_tokenizer, tok, student_rows, _vocab_rows(model))
    teacher = LiveTeacher(lm, perm, path, name)
    teacher.check = check_teacher(lm, list(examples), layout, path, check)
    return teacher


def _vocab_rows(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def check_teacher(lm: CausalLMWithLoss, examples: list, layout: str | None, path: str, mode: str = "auto") -> dict:
    """The start-up probe (:func:`sftune.probe.compare`) on the teacher: its hidden states in
    ``layout`` (the student's, or ``padded``) and its head's cross-entropy equal the teacher called
    the plain transformers way, one example at a time, on ``examples`` (the student's probe
    examples: a few of this run's own). A mismatch is refused: the teacher has no layout to fall
    back to, it must see the student's rows. In ``padded`` rows (distill-prepare) a head the probe
    finds is not the plain linear layer the chunked path reads (RoBERTa's transform before its
    decoder, softcapping) is allowed: the teacher's own logits are used (``lm.fused`` set False),
    one example per forward. ``mode`` is ``model.check``: ``off`` skips the live teacher's check
    (the user's call, as for the student), never distill-prepare's, which decides from it whether
    the head is the plain linear layer (cheap: a few examples). Returns the record (the ``check``
    of the ``distill`` description in the first metrics record)."""
    if (mode == "off" and layout != PADDED) or not examples or layout is None:
        return {"status": "off"}
    was = lm.training
    lm.eval()
    try:
        res = compare(lm, examples, [layout], lm.fused, next(lm.parameters()).device)
    except Exception as e:  # noqa: BLE001 - the reference itself fails: a refusal, never a traceback
        raise ConfigError(f"distill.teacher '{path}' fails when run on one of this run's examples alone "
                          f"({type(e).__name__}: {e})"[:400]) from e
    finally:
        lm.train(was)
    n = len(examples)
    if res.get("nonfinite"):
        dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
        raise ConfigError(f"distill.teacher '{path}' gives non-finite outputs on {n} of this run's examples run one "
                          f"at a time (in {dtype}): it cannot teach (in half precision, try distill.teacher_dtype="
                          "float32)")
    if res["layout"] == PADDED and not res["fused"]:
        lm.fused = False  # its own logits: the head's cross-entropy matched the reference's
    elif res["layout"] is None or not res["fused"]:
        what = (f"the student's {layout} layout" if layout != PADDED else
                "one example per row, padded (as sftune distill-prepare runs it)")
        diffs = {**res["diffs"], **({"head": res["fused_diff"]} if "fused_diff" in res else {})}
        why = ("a body that numbers positions its own way or attends across examples" if res["layout"] is None else
               "its output layer is not the one linear layer sftune's chunked distillation reads: it transforms "
               "or scales the body's output")
        todo = ("choose a teacher of another family" if layout == PADDED else
                "choose a teacher of another family, or run this one once with sftune distill-prepare (one example "
                "per row, positions numbered by the model itself) and train with distill.saved")
        raise ConfigError(
            f"distill.teacher '{path}' ({getattr(lm.causal_lm.config, 'model_type', '?')}) does not give the same "
            f"outputs in {what} as run one example at a time on {n} of this run's examples (relative differences "
            f"{format_diffs(diffs, res['errors'])}; {why}): "
            f"its distribution would be wrong. {todo[0].upper() + todo[1:]}")
    return {"status": "exact", "layout": layout, "examples": n, "max_diff": res["diffs"][layout],
            **({} if lm.fused else {"logits": "the model's own (its head is not one linear layer)"})}


class LiveTeacher:
    """A frozen teacher that runs on the student's batches (see the module docstring)."""

    def __init__(self, lm: CausalLMWithLoss, perm: torch.Tensor | None = None, path: str = "", dtype: str = ""):
        self.lm, self.path, self.dtype = lm, path, dtype
        self.perm = None if perm is None else perm.to(next(lm.parameters()).device)
        self.compiled = False
        self.check: dict = {"status": "off"}
        """The start-up probe's record (:func:`check_teacher`)."""
        self.seconds = 0.0
        """Time in the teacher's body (synchronised on CUDA), since :meth:`take_seconds`."""

    def describe(self) -> dict:
        _, total = count_parameters(self.lm)
        size = sum(p.numel() * p.element_size() for p in self.lm.parameters())
        return {"teacher": self.path, "how": "live", "dtype": self.dtype, "parameters": total,
                "weights_mb": round(size / 2**20, 1), "remapped_vocab": self.perm is not None,
                "check": self.check, **({"compiled": True} if self.compiled else {})}

    def compile(self) -> None:
        """``train.compile``: the body compiled (``dynamic=True``, as the student), called as before."""
        body_of(self.lm.causal_lm).compile(dynamic=True)
        self.compiled = True

    def take_seconds(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def rows(self, kw: dict):
        """``chunk(s, e) -> TeacherChunk`` over the batch's loss positions (``kw``: the student's
        forward arguments): the body runs once here, the head chunk by chunk in ``chunk``."""
        start = time.perf_counter()
        cuda = kw["input_ids"].device.type == "cuda"
        with torch.no_grad():
            positions = None if self.lm.layout == PADDED else kw["position_ids"]  # padded: the model numbers them
            args = (kw["input_ids"], positions, kw.get("doc_bounds"), kw.get("model_inputs"))
            # unfused (distill-prepare only, one example per forward): the model's own logits at the loss positions
            hidden = self.lm.hidden_states(*args) if self.lm.fused else self.lm.logits(*args)
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, kw["loss_index"])
        if cuda:
            torch.cuda.synchronize(hidden.device)
        self.seconds += time.perf_counter() - start
        head = self.lm.causal_lm.get_output_embeddings() if self.lm.fused else None
        targets, perm = kw["loss_targets"], self.perm
        acc = torch.promote_types(torch.float32, hidden.dtype)

        def chunk(s: int, e: int) -> TeacherChunk:
            with torch.no_grad():
                t = (hidden[s:e] if head is None else F.linear(hidden[s:e], head.weight, head.bias)).to(acc)
                if perm is not None:
                    t = t[:, perm]
                ce = torch.logsumexp(t, -1) - t.gather(1, targets[s:e, None]).squeeze(1)
            return TeacherChunk(logits=t, ce=ce)

        return chunk
