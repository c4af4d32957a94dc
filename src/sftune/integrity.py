"""``sftune verify RUN_DIR``: a run's checkpoints and final model, intact or not, and which checkpoint a
resume would take.

Each checkpoint is checked against its manifest (:mod:`sftune.digests`); one without a manifest
(written before sftune recorded digests) is checked by loading its files. The final model is checked
against ``sftune_manifest.json``. Read-only: a resume (:func:`sftune.checkpoint.load_checkpoint`) is
what sets a damaged checkpoint aside.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from sftune.checkpoint import checkpoint_dir, damaged_file, list_checkpoints
from sftune.digests import CORRUPT, MODEL_MANIFEST, Check, check_dir


def verify_run(run_dir: str | Path) -> dict:
    """Every checkpoint of a run and its final model: intact, damaged (which file) or legacy; and which
    checkpoint a resume would take (the newest that is not damaged)."""
    run = Path(run_dir)
    report: dict = {"run": str(run), "checkpoints": [], "set_aside": [], "resume": None, "final_model": None}
    for ck in list_checkpoints(run):
        c = check_dir(ck)
        if c.status == "legacy" and (found := damaged_file(ck)) is not None:
            c = Check(str(ck), "damaged", found[0].relative_to(ck).as_posix(), found[1])
        report["checkpoints"].append({"name": ck.name, **asdict(c)})
        if c.ok:
            report["resume"] = ck.name
    root = checkpoint_dir(run)
    if root.is_dir():
        report["set_aside"] = sorted(p.name for p in root.iterdir() if CORRUPT in p.name)
    if (run / MODEL_MANIFEST).exists():
        report["final_model"] = asdict(check_dir(run, MODEL_MANIFEST))
    elif any(run.glob("*.safetensors")) or (run / "pytorch_model.bin").exists():
        report["final_model"] = asdict(Check(str(run), "legacy"))
    report["ok"] = all(c["status"] != "damaged" for c in report["checkpoints"]) and \
        (report["final_model"] or {}).get("status") != "damaged"
    return report


def describe(report: dict) -> list[str]:
    """``sftune verify``'s lines."""
    lines = [f"run {report['run']}"]
    if not report["checkpoints"]:
        lines.append("  checkpoints: none")
    for c in report["checkpoints"]:
        lines.append(f"  {c['name']}: {Check(**{k: v for k, v in c.items() if k != 'name'}).line()}")
    for name in report["set_aside"]:
        lines.append(f"  {name}: set aside earlier (damaged)")
    if report["checkpoints"]:
        lines.append(f"  a resume would take: {report['resume'] or 'none (no intact checkpoint)'}")
    fm = report["final_model"]
    lines.append("  final model: " + ("none" if fm is None else Check(**fm).line()))
    lines.append("verify: OK" if report["ok"] else "verify: DAMAGED")
    return lines
