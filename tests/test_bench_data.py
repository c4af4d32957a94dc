"""bench/data.py: its generated rows, and the streaming mode reported "not available" (not a crash)
while ``data.streaming`` is not a key; the child measurement itself runs in-process on few rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import data as bench_data

    if not bench_data.ALPACA.exists() or not bench_data.TOKENIZER.exists():
        pytest.skip("needs ../shared (alpaca_5000.json and the GPT-2 tokenizer)")
    return bench_data


def test_rows_are_varied_and_reused(bench, tmp_path):
    path = bench.make_rows(12_000, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12_000 and len({json.dumps(r) for r in rows}) == 12_000
    assert rows[5000]["instruction"].endswith(" (variant 1)") and rows[5000]["output"].endswith(" (variant 1)")
    assert bench.make_rows(12_000, tmp_path) == path  # written once


@pytest.mark.slow
def test_sftune_child_and_streaming_mode(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = str(bench.make_rows(300, tmp_path))
    res = bench.child_sftune(path, streaming=False)
    assert res["rows"] == 300 and res["examples"] >= 290 and res["tokens"] > 0 and res["cpu"] > 0
    streamed = bench.child_sftune(path, streaming=True)
    from sftune.config import load_config

    try:
        load_config(None, {"data.streaming": True})
    except Exception:  # this version has no streaming: reported, not raised
        assert "data.streaming" in streamed["unavailable"]
    else:
        assert streamed["examples"] >= 1
