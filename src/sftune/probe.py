"""The start-up equivalence probe: is the chosen row layout exact for *this* model on *this* data?

``sftune.capabilities`` predicts which row layouts and which loss a model can take; this module
checks the prediction before the first step. A few (3) of the run's own training examples, the
longest of the first few hundred (so sliding windows are exercised), are run without gradients:

* one at a time through the plain model: the reference;
* through each candidate layout (``flat`` -> ``rows`` -> ``per_example``), until one gives every
  example's last hidden states (what the logits are a per-token function of) within fp tolerance
  of the reference;
* through the loss: the fused lm_head + cross-entropy sum against the cross-entropy of the model's
  own logits (which include every logit transform). On a mismatch the unfused loss is used.

The reference is the model called as plain transformers calls it (no ``position_ids``: a family
that numbers positions its own way, such as RoBERTa's offset, shows as a mismatch). Any exception
raised while a candidate layout or the fused loss runs (a layer that reads the 4-D mask, a head
that does not take the body's output) is a non-match, recorded with its reason; when no layout
matches, the run is refused with a message.

With ``model.check=auto`` a mismatch falls back and says so in the run's one ``model check`` line;
``strict`` refuses; ``off`` skips. The decision is all-reduced (safest wins), so every rank of a
data-parallel run lays its batches out the same way. The result goes into the data report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sftune.attention import disable_varlen, enable_varlen, set_backend
from sftune.backends import attention_line, choose_attention
from sftune.capabilities import LAYOUTS, Capabilities, capabilities
from sftune.data.packing import collate
from sftune.errors import ConfigError
from sftune.loss import CausalLMWithLoss
from sftune.model import unwrap_causal_lm

PADDED = "padded"
"""Not a training layout: one example per row, padded right, called without ``position_ids`` (the
model numbers positions itself, as in the reference): how ``sftune distill-prepare`` runs a teacher,
which :func:`compare` takes as a candidate too."""

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
"""Relative tolerance per dtype (fp32 rounding gives ~1e-6); half precision gets 5e-2."""


@dataclass
class Choice:
    layout: str
    fused: bool
    caps: Capabilities
    line: str
    record: dict = field(default_factory=dict)


def probe_examples(data, k: int = 3, scan: int = 256) -> list[tuple[list[int], list[int]]]:
    """The ``k`` longest of the first ``scan`` training examples (deterministic: same on every rank)."""
    lengths = np.asarray(data.lengths[:scan])
    order = np.argsort(-lengths, kind="stable")[:k]
    out = []
    for i in sorted(order.tolist()):
        ids, labels = data.example(i)
        extra = data.extras(i) if getattr(data, "has_extras", False) else {}  # images (sftune.data.extras)
        out.append(([int(x) for x in ids], [int(x) for x in labels]) + ((None, extra) if extra else ()))
    return out


def _batch(rows, device):
    return collate(rows, pad_id=0).to(device)


def per_example(hidden: torch.Tensor, rows) -> list[torch.Tensor]:
    """Each example's slice of ``[rows, T, ...]`` outputs, for rows laid out as :func:`collate` does."""
    out = []
    for r, row in enumerate(rows):
        pos = 0
        for ex in row:
            out.append(hidden[r, pos:pos + len(ex[0])])
            pos += len(ex[0])
    return out


def _rel_diff(h: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest per-position relative L2 difference: robust to outlier features (one large
    hidden dimension would hide differences in a max-abs metric), and a leak into any single
    position of an example shows."""
    return float(((h - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-6)).max())


def _layout_rows(layout: str, examples):
    return [[e] for e in examples] if layout in ("per_example", PADDED) else [list(examples)]


def _loss(lm, b, doc_bounds, fused: bool) -> float:
    was, lm.fused = lm.fused, fused
    try:
        return float(lm(b.input_ids, b.position_ids, b.loss_index, b.loss_targets, doc_bounds,
                        model_inputs=b.model_inputs or None))
    finally:
        lm.fused = was


def compare(lm, examples, candidates, fused: bool, device, tol: float | None = None) -> dict:
    """Run the probe; returns ``{"layout", "fused", "diffs": {layout: max rel diff}, "loss_diff"}``
    (``layout`` None: no candidate matched)."""
    dtype = next(lm.parameters()).dtype
    tol = tol or TOLERANCE.get(dtype, 5e-2)
    with torch.no_grad():
        ref_hidden, ref_loss = [], 0.0
        for e in examples:  # the plain model on one example, as transformers calls it: no position_ids
            b = _batch([[e]], device)
            extra = b.model_inputs or None  # images (sftune.data.vision_batch); their positions too
            ref_hidden.append(lm.hidden_states(b.input_ids, None, model_inputs=extra)[0].float())
            logits = lm.logits(b.input_ids, None, model_inputs=extra)[0].index_select(0, b.loss_index)
            ref_loss += float(F.cross_entropy(logits.float(), b.loss_targets, reduction="sum"))
        result = {"layout": None, "fused": fused, "diffs": {}, "loss_diff": None, "errors": {}}
        if not (math.isfinite(ref_loss) and all(bool(torch.isfinite(h).all()) for h in ref_hidden)):
            result["nonfinite"] = True  # nothing to compare against: training's non-finite guard says so
            return result
        norm = max(abs(ref_loss), 1.0)
        for layout in candidates:
            rows = _layout_rows(layout, examples)
            b = _batch(rows, device)
            if layout == PADDED:
                b.position_ids = None
            doc_bounds = b.doc_bounds if layout == "flat" else None
            try:
                hidden = lm.hidden_states(b.input_ids, b.position_ids, doc_bounds, b.model_inputs or None).float()
                diff = max(_rel_diff(h, r) for h, r in zip(per_example(hidden, rows), ref_hidden))
            except Exception as e:  # noqa: BLE001 - any failure of a candidate is a non-match, with its reason
                result["diffs"][layout] = float("inf")
                result["errors"][layout] = _why(e)
                continue
            result["diffs"][layout] = diff
            if diff > tol:
                continue
            loss_diff = _loss_diff(lm, b, doc_bounds, fused, ref_loss, norm, result, "fused loss")
            if fused and loss_diff > tol:
                result["fused"] = fused = False
                result["fused_diff"] = loss_diff
                loss_diff = _loss_diff(lm, b, doc_bounds, False, ref_loss, norm, result, f"{layout} loss")
            result["loss_diff"] = loss_diff
            if loss_diff <= tol:
                result["layout"] = layout
                break
            result["diffs"][f"{layout} loss"] = loss_diff  # the outputs matched, the loss did not
    return result


def _why(e: Exception) -> str:
    """A short reason for a failed candidate (the exception's type and first line)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:160]


def _loss_diff(lm, b, doc_bounds, fused: bool, ref_loss: float, norm: float, result: dict, what: str) -> float:
    """The relative difference of the batch's loss from the reference; inf (with the reason in
    ``result["errors"]``) when computing it raises."""
    try:
        return abs(_loss(lm, b, doc_bounds, fused) - ref_loss) / norm
    except Exception as e:  # noqa: BLE001 - a loss that cannot be computed is a non-match
        result["errors"][what] = _why(e)
        return float("inf")


def _agree(values: list[int], device) -> list[int]:
    """The element-wise maximum over ranks (the safest choice), so every rank decides the same."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def choose_layout(cfg, model, data, report=None, console=None, device=None, sharded: bool = False) -> Choice:
    """Capabilities, then the probe: the row layout and loss of the run, chosen once.

    Switches the model to per-example attention when the layout is ``flat`` (and back otherwise),
    records the result in ``report`` (a DataReport) and prints the one ``model check`` line. The
    probe runs on ``device`` (the model is moved there, as training would); a model that will be
    sharded (FSDP, ZeRO-3) may not fit one device, so there the capabilities decide alone.

    The steps: the candidate layouts from the capabilities; the attention kernel for ``flat``; the
    comparison on a few of the run's examples (falling back to the per-example loop when the kernel
    differs); the verdict agreed across ranks; refusal, or ``strict``'s refusal of a fallback; the
    one-line message; the record."""
    causal = unwrap_causal_lm(model)
    caps, candidates, why_not = _candidates(cfg, model, causal)
    mode = cfg.model.check
    device = _on_device(model, device, sharded)
    backend, why_backend = _choose_kernel(causal, device, caps, candidates)
    lm = CausalLMWithLoss(model, fused=caps.fused_loss)
    record = {"check": mode, "layout": candidates[0], "fused_loss": lm.fused, "left_out": why_not}
    start = time.perf_counter()
    examples = probe_examples(data.train) if mode != "off" and not sharded else []
    if not examples:
        layout, fused, line = _unchecked(mode, sharded, candidates[0], lm.fused, record)
    else:
        res, backend, why_backend = _run_probe(model, lm, causal, caps, examples, candidates, device, backend,
                                               why_backend, record)
        layout, fused = _agreed(res, lm.fused, device)
        ms = 1000 * (time.perf_counter() - start)
        _record_probe(record, examples, res, ms)
        if layout is None:
            _refuse(record, res, lm, caps, len(examples))
        if mode == "strict":
            _refuse_fallback(res, layout, fused, candidates[0], lm.fused, caps)
        line = _probe_line(record, res, layout, fused, candidates[0], lm, len(examples), ms)
    line += _left_out(why_not)
    _set_attention(causal, layout, backend, record)
    record.update(layout=layout, fused_loss=fused, line=line.replace("[yellow]", "").replace("[/]", ""))
    _tell(report, console, record, line, layout, backend, why_backend)
    return Choice(layout, fused, caps, line, record)


def _candidates(cfg, model, causal) -> tuple[Capabilities, list[str], dict[str, str]]:
    """The model's capabilities, its candidate layouts (best first) and why the others are left out;
    ``flat`` is left out too when the model takes no custom attention implementation."""
    caps = capabilities(model, kernel=cfg.model.attn_implementation, compile=cfg.train.compile)
    candidates = list(caps.layouts)
    why_not = dict(caps.why_not)
    if "flat" in candidates and not enable_varlen(causal):
        candidates.remove("flat")
        why_not["flat"] = "the model does not accept a custom attention implementation"
    return caps, candidates, why_not


def _on_device(model, device, sharded: bool):
    """The device the probe runs on: ``device`` (the model moved there) unless the model will be
    sharded; else where the model is."""
    if device is not None and not sharded and next(model.parameters()).device != torch.device(device):
        model.to(device)
    return next(model.parameters()).device


def _choose_kernel(causal, device, caps, candidates) -> tuple[str, str]:
    """The attention kernel for the ``flat`` layout (the per-example loop when ``flat`` is no
    candidate), set on the model; with the reason for the choice."""
    backend, why_backend = choose_attention(device, caps) if "flat" in candidates else ("loop", "")
    set_backend(causal, backend)
    return backend, why_backend


def _unchecked(mode: str, sharded: bool, layout: str, fused: bool, record: dict) -> tuple[str, bool, str]:
    """No probe (``model.check=off``, a sharded model, no examples): the capabilities decide."""
    why = "off" if mode == "off" else "skipped (sharded model)" if sharded else "skipped (no examples)"
    record["status"] = "off"
    return layout, fused, f"model check: {why}; {layout} layout from the model's capabilities"


def _run_probe(model, lm, causal, caps, examples, candidates, device, backend: str, why_backend: str,
               record: dict) -> tuple[dict, str, str]:
    """:func:`compare` in eval mode; when the kernel does not reproduce the reference, again with the
    per-example loop (the kernel's difference goes into ``record``). Returns the result and the
    kernel used, with its reason. A reference that fails is the refusal: nothing can match it."""
    was = model.training
    model.eval()
    try:
        # flash-attention computes in half precision: judged at half-precision tolerance
        try:
            res = compare(lm, examples, candidates, lm.fused, device, 5e-2 if backend == "flash" else None)
            if backend != "loop" and res["layout"] != "flat":  # the kernel differed: the per-example loop
                failed = res["errors"].get("flat")
                record["attention_diff"] = failed or res["diffs"].get("flat")
                backend, why_backend = "loop", f"{backend} {'failed' if failed else 'differed'}"
                set_backend(causal, backend)
                res = compare(lm, examples, candidates, lm.fused, device)
        except Exception as e:  # noqa: BLE001 - the reference itself fails: no layout can match it
            raise ConfigError(f"model check: {caps.model_type} fails when run on one of this run's examples "
                              f"alone ({_why(e)}); it cannot be trained as it is") from e
    finally:
        model.train(was)
    if res.get("nonfinite"):
        res = {**res, "layout": candidates[0], "fused": lm.fused}
        record["status"] = "nonfinite"
    return res, backend, why_backend


def _agreed(res: dict, fused: bool, device) -> tuple[str | None, bool]:
    """The layout (None: none matched) and loss agreed across ranks, the safest of every rank's."""
    code = [LAYOUTS.index(res["layout"]) if res["layout"] else len(LAYOUTS), int(not res["fused"])]
    code = _agree(code, device)
    return (LAYOUTS[code[0]] if code[0] < len(LAYOUTS) else None), not code[1] and fused


def _record_probe(record: dict, examples, res: dict, ms: float) -> None:
    """What the probe ran on, how long it took and what it found."""
    record.update(examples=len(examples), tokens=sum(len(e[0]) for e in examples), ms=round(ms, 1),
                  diffs=res["diffs"], loss_diff=res["loss_diff"],
                  **({"errors": res["errors"]} if res["errors"] else {}))


def _tolerance(lm) -> float:
    return TOLERANCE.get(next(lm.parameters()).dtype, 5e-2)


def _refuse(record: dict, res: dict, lm, caps, n: int) -> None:
    """No layout matched (on some rank): the clear refusal, with the likely reason."""
    record["status"] = "refused"
    alone = res["diffs"].get("per_example", 0) > _tolerance(lm)
    why = ("even one example per row differs from the model called alone (a body that numbers positions its "
           "own way, or is not causal)" if alone else
           "the model gives different outputs for the same example in a batch")
    raise ConfigError(
        f"model check: no row layout reproduces {caps.model_type} run one example at a time on {n} of this "
        f"run's examples (relative differences {format_diffs(res['diffs'], res['errors'])}); {why}. "
        "Set model.check=off to train anyway")


def _refuse_fallback(res: dict, layout: str, fused: bool, predicted: str, predicted_fused: bool, caps) -> None:
    """``model.check=strict``: a layout or loss other than the predicted one is refused, naming what
    ``auto`` would use."""
    if layout != predicted or fused != predicted_fused:
        raise ConfigError(
            f"model check (strict): the {predicted} layout{' with the fused loss' if predicted_fused else ''} does "
            f"not match {caps.model_type} run one example at a time (relative differences {format_diffs(res['diffs'])}"
            f"{', loss ' + format(res.get('fused_diff', 0), '.2g') if fused != predicted_fused else ''}); "
            f"model.check=auto would use the {layout} layout{'' if fused else ' and the unfused loss'}")


def _probe_line(record: dict, res: dict, layout: str, fused: bool, predicted: str, lm, n: int, ms: float) -> str:
    """The one ``model check`` line of a probe that ran (exact, fallback or non-finite); sets the
    record's status."""
    what = f"{layout} layout{'' if fused else ', unfused loss'}"
    if record.get("status") == "nonfinite":
        return f"model check: skipped, the model's outputs are not finite on this run's examples; {what}"
    if layout != predicted or fused != lm.fused:
        bad = {k: v for k, v in res["diffs"].items() if v > _tolerance(lm)}
        if fused != lm.fused:
            bad["fused loss"] = res.get("fused_diff", float("nan"))
        line = (f"model check: [yellow]{', '.join(bad) or 'another rank'} differed[/] from the model run one "
                f"example at a time ({format_diffs(bad, res['errors'])}) → {what} (exact)")
        record["status"] = "fallback"
    else:
        line = f"model check: {what} matches the model run one example at a time"
        record["status"] = "exact"
    return line + f" ({n} examples, max diff {res['diffs'].get(layout, 0):.1e}, {ms:.0f} ms)"


def _left_out(why_not: dict[str, str]) -> str:
    """``; left out flat, rows: <reason>`` (layouts grouped by reason), or nothing."""
    reasons: dict[str, list[str]] = {}
    for k, v in why_not.items():
        reasons.setdefault(v, []).append(k)
    left_out = "; ".join(f"{', '.join(ks)}: {v}" for v, ks in reasons.items())
    return f"; left out {left_out}" if left_out else ""


def _set_attention(causal, layout: str, backend: str, record: dict) -> None:
    """Per-example attention (with its kernel, recorded) for ``flat``; the model's own otherwise."""
    if layout != "flat":
        disable_varlen(causal)
        set_backend(causal, "loop")
    else:
        record["attention"] = backend


def _tell(report, console, record: dict, line: str, layout: str, backend: str, why_backend: str) -> None:
    """The record into the data report; the line (and the kernel's, for ``flat``) to the console."""
    if report is not None:
        report.model_check = record
    if console is not None:
        console.print(line)
        if layout == "flat":
            console.print(attention_line(backend, why_backend), markup=False)


def format_diffs(diffs: dict, errors: dict | None = None) -> str:
    """``flat 0.31, rows 1e-07``; a candidate that raised shows its reason instead of ``inf``."""
    errors = errors or {}
    shown = [f"{k} failed ({errors[k]})" if k in errors else f"{k} {v:.2g}" for k, v in diffs.items()]
    return ", ".join(shown + [f"{k} failed ({v})" for k, v in errors.items() if k not in diffs])
