"""Streaming I/O: atomic writes, resumable positions (jsonl, gz, parquet), bad lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from herd.data.records import RecordReader, atomic_save_npy, atomic_write, read_parts, write_part


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_write(target) as f:
        f.write("whole")
    assert target.read_text() == "whole" and len(list(tmp_path.iterdir())) == 1
    atomic_save_npy(tmp_path / "a.npy", np.arange(3))
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2]


def test_positions_resume_across_files(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text('{"i": 0}\n\n{"i": 1}\nnot json\n[3]\n{"i": 2}\n')
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt") as f:
        f.write("".join(json.dumps({"i": i}) + "\n" for i in range(3, 6)))
    reader = RecordReader([a, b])
    items = list(reader)
    assert [it.record["i"] if it.record else it.bad for it in items] == [
        0,
        1,
        "bad_json",
        "not_an_object",
        2,
        3,
        4,
        5,
    ]
    for k, it in enumerate(items):  # resuming after any item yields exactly the rest
        rest = list(reader.iter_from(it.pos))
        assert [(x.record, x.bad) for x in rest] == [(x.record, x.bad) for x in items[k + 1 :]]


def test_parquet_parts(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    recs = [{"id": i, "text": f"t{i}"} for i in range(5)]
    write_part(tmp_path / "p.parquet", recs)
    write_part(tmp_path / "q.jsonl", recs[:2])
    assert list(read_parts([tmp_path / "p.parquet", tmp_path / "q.jsonl"])) == recs + recs[:2]
    assert list(read_parts([])) == []
