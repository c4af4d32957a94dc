"""Row readers of a stream (``sftune.data.readers``): JSONL, CSV, Parquet and a directory of shards read
row by row, each resuming from its cursor (byte offset, row index, row group) with the same rows."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from sftune.config import DataConfig
from sftune.data.readers import RowReader


def _rows(n, tag="r"):
    return [{"instruction": f"{tag}{i} " * (1 + i % 5), "output": f"a{i} " * (1 + i % 3)} for i in range(n)]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "dir"])
def test_reader_resumes_from_its_cursor(tmp_path, kind):
    rows = _rows(23)
    if kind == "csv":
        import csv

        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "output"])
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    elif kind == "dir":
        path = tmp_path / "d"
        path.mkdir()
        write_jsonl(path / "train-00000.jsonl", rows[:10])
        write_jsonl(path / "train-00001.jsonl", rows[10:])
    else:
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path))
    reader = RowReader(cfg, 0, seed=1)
    first = [next(reader)[0] for _ in range(30)]  # past the end: a second pass
    assert first[:23] == rows and sorted(map(json.dumps, first[23:])) == sorted(map(json.dumps, first[23:]))
    assert reader.cursor["pass"] == 1
    for cut in (0, 7, 12, 26):
        r = RowReader(cfg, 0, seed=1)
        for _ in range(cut):
            next(r)
        again = RowReader(cfg, 0, seed=1, cursor=dict(r.cursor))
        assert [next(again)[0] for _ in range(30 - cut)] == first[cut:], cut
