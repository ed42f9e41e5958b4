"""Streaming document readers: jsonl (bad lines counted), parquet, text folders, compression, globs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from herd.data.records import SkipCounter
from herd.data.training.text_sources import expand_paths, iter_documents, read_parquet_documents


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path):
    write_lines(
        tmp_path / "a.jsonl",
        [
            json.dumps({"text": "first"}),
            "",  # blank: not a record, not counted
            "{not json",
            json.dumps({"body": "no text field"}),
            json.dumps({"text": 42}),
            json.dumps(["a", "list"]),
            b'{"text": "bad \xff utf8"}',
            json.dumps({"text": "last", "id": 7}),
        ],
    )
    skipped = SkipCounter()
    assert list(iter_documents("jsonl", [tmp_path / "a.jsonl"], "text", skipped)) == ["first", "last"]
    assert skipped.count == 5
    assert skipped.examples[0].startswith(f"{tmp_path / 'a.jsonl'}:3: JSONDecodeError")
    assert "not a string" in skipped.examples[2] and "not an object" in skipped.examples[3]


def test_globs_folders_and_gzip_in_a_deterministic_order(tmp_path):
    write_lines(tmp_path / "b.jsonl.gz", [json.dumps({"t": "b1"}), json.dumps({"t": "b2"})])
    write_lines(tmp_path / "a.jsonl", [json.dumps({"t": "a1"})])
    (tmp_path / "notes.md").write_text("ignored")
    sub = tmp_path / "sub"
    sub.mkdir()
    write_lines(sub / "c.jsonl", [json.dumps({"t": "c1"})])
    assert list(iter_documents("jsonl", [str(tmp_path / "*.jsonl*")], "t")) == ["a1", "b1", "b2"]
    # a folder is searched recursively; a file named twice (folder + explicit) is read once
    docs = list(iter_documents("jsonl", [tmp_path, tmp_path / "a.jsonl"], "t"))
    assert docs == ["a1", "b1", "b2", "c1"]
    assert expand_paths("jsonl", [sub / "c.jsonl", tmp_path / "a.jsonl"]) == [
        sub / "c.jsonl",
        tmp_path / "a.jsonl",
    ]


def test_text_folder_one_document_per_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("alpha\nmore")
    (tmp_path / "b" / "c.txt.gz").write_bytes(gzip.compress("gamma ünï".encode()))
    (tmp_path / "b" / "d.txt").write_bytes(b"bad \xff byte")
    (tmp_path / "skip.json").write_text("{}")
    docs = list(iter_documents("text", [tmp_path]))
    assert docs == ["alpha\nmore", "gamma ünï", "bad \ufffd byte"]


def test_parquet_in_record_batches_nulls_counted(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"doc {i}" if i % 7 else None for i in range(50)]
    table = pa.table({"id": list(range(50)), "content": texts})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=16)
    pq.write_table(pa.table({"content": ["tail"]}), tmp_path / "part-1.parquet")
    skipped = SkipCounter()
    docs = list(iter_documents("parquet", [str(tmp_path / "part-*.parquet")], "content", skipped))
    assert docs == [t for t in texts if t is not None] + ["tail"]
    assert skipped.count == 8 and "row 7" in skipped.examples[1]
    # batch size does not change what is read
    small = list(read_parquet_documents([tmp_path / "part-0.parquet"], "content", batch_rows=3))
    assert small == docs[:-1]


def test_parquet_missing_column_or_bad_file_names_the_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(ValueError, match=r"x\.parquet has no column 'text' \(columns: body\)"):
        list(iter_documents("parquet", [path], "text"))
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(ValueError, match=r"x\.parquet: column 'text' holds int64"):
        list(iter_documents("parquet", [path], "text"))
    path.write_text("not parquet")
    with pytest.raises(ValueError, match=r"x\.parquet is not a readable parquet file"):
        list(iter_documents("parquet", [path], "text"))


def test_bad_paths_fail_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_documents("jsonl", [tmp_path / "missing.jsonl"])
    with pytest.raises(FileNotFoundError, match="no files match"):
        iter_documents("jsonl", [str(tmp_path / "*.jsonl")])
    with pytest.raises(FileNotFoundError, match=r"holds no \.parquet files"):
        iter_documents("parquet", [tmp_path])
    with pytest.raises(ValueError, match="source must be one of"):
        iter_documents("csv", [tmp_path])


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    path = write_lines(tmp_path / "a.jsonl.gz", [json.dumps({"text": "x" * 50})] * 200)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(OSError, match=r"a\.jsonl\.gz: cannot read"):
        list(iter_documents("jsonl", [path]))


def test_zstd_jsonl(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    data = "".join(json.dumps({"text": f"z{i}"}) + "\n" for i in range(3)).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    assert list(iter_documents("jsonl", [tmp_path])) == ["z0", "z1", "z2"]
