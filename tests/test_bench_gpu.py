"""bench/gpu.py end to end on a CPU (``--smoke``: tiny shapes, a few steps); TRL's columns run
when trl is installed, Liger's needs CUDA and is reported as skipped here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    if not (gpu.SHARED / "models" / "gpt2-tokenizer").exists():
        pytest.skip("needs ../shared (the GPT-2 tokenizer and data)")
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--smoke", "--models", "llama-1b", "--examples", "16", "--out", str(out)])
    res = json.loads(out.read_text())
    per = res["models"]["llama-1b"]["results"]
    assert rc == 0, per
    assert res["smoke"] and res["matmul_peak_tflops"] > 0
    s = per["sftune"]
    assert s["tokens_per_s"] > 0 and s["steps"] >= 2 and 0 < s["mfu"] < 1 and s["final_loss"] > 0
    assert "skipped" in per["trl_liger"]
    if importlib.util.find_spec("trl") is None:
        assert "skipped" in per["trl"]
    else:
        assert per["trl"]["tokens_per_s"] > 0 and per["trl"]["attention"] == "sdpa"
