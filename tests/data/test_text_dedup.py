"""Text dedup: URL (newest wins), MinHash LSH, line buckets, bad records, parquet, resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import write_jsonl

from herd.data.curation.text_dedup import (
    MinHashDedup,
    ShingleHasher,
    TextDedupConfig,
    dedup_text,
    minhash_values,
    normalise_url,
    parse_timestamp,
)
from herd.data.records import RecordReader, read_jsonl, read_parts

datasketch = pytest.importorskip("datasketch")

WORDS = [f"w{i}" for i in range(3000)]


def doc(rng: np.random.Generator, n: int = 300) -> str:
    return " ".join(rng.choice(WORDS, n))


def cfg(**kw) -> TextDedupConfig:
    return TextDedupConfig(**{"progress": False, "chunk_size": 7, **kw})


def test_minhash_matches_datasketch_and_estimates_jaccard() -> None:
    rng = np.random.default_rng(0)
    hv = rng.integers(0, 2**32, 300, dtype=np.uint64).astype(np.uint32)
    ref = datasketch.MinHash(num_perm=64, seed=3, hashfunc=int)
    ref.update_batch([int(h) for h in hv])
    perms = datasketch.MinHash(num_perm=64, seed=3).permutations
    np.testing.assert_array_equal(minhash_values(hv, perms), ref.hashvalues)

    hasher = ShingleHasher(shingle_size=3)
    a = doc(rng, 400)
    words = a.split()
    b = " ".join(words[:300] + list(rng.choice(WORDS, 100)))
    sa, sb = set(hasher(a).tolist()), set(hasher(b).tolist())
    true_j = len(sa & sb) / len(sa | sb)
    stage = MinHashDedup(num_perm=256, shingle_size=3)
    est = stage.signature(a).jaccard(stage.signature(b))
    assert abs(est - true_j) < 0.08, (est, true_j)
    assert len(hasher("one two")) == 1 and len(hasher("")) == 0  # short docs: one shingle


def test_url_helpers() -> None:
    assert normalise_url(" HTTP://Example.COM/Path?q=1#frag ") == "http://example.com/Path?q=1"
    assert parse_timestamp("2024-01-02T00:00:00+00:00") == 1704153600.0
    assert parse_timestamp("2024-01-02T00:00:00Z") == 1704153600.0
    assert parse_timestamp(5) == 5.0 and parse_timestamp("17.5") == 17.5
    assert parse_timestamp("yesterday") is None and parse_timestamp(None) is None


def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    rng = np.random.default_rng(1)
    texts = {f"d{i}": doc(rng) for i in range(20)}
    rows: list = []
    for i in range(20):
        rows.append({"id": f"d{i}", "text": texts[f"d{i}"], "url": f"https://site/{i}", "timestamp": 100 + i})
    # Older / newer versions of d0 and d1's URLs: the newest must win.
    rows.append(
        {"id": "d0-new", "text": doc(rng), "url": "HTTPS://SITE/0#top", "timestamp": "2030-01-01T00:00:00"}
    )
    rows.append({"id": "d1-old", "text": doc(rng), "url": "https://site/1", "timestamp": 5})
    rows.append(
        {"id": "d2-tie", "text": doc(rng), "url": "https://site/2", "timestamp": 102}
    )  # tie: first wins
    rows.append({"id": "d3-nots", "text": doc(rng), "url": "https://site/3", "timestamp": "??"})
    # Near duplicates of d5 (3 words changed) and d6 (exact copy), without URLs.
    w = texts["d5"].split()
    w[10], w[50], w[90] = "changed", "words", "here"
    rows.append({"id": "d5-near", "text": " ".join(w)})
    rows.append({"id": "d6-copy", "text": texts["d6"], "url": ""})
    # Bad records: never a crash, counted.
    rows += ["{oops", "[1, 2]", {"id": "no-text"}, {"id": "num-text", "text": 5}]
    return write_jsonl(tmp_path / "in.jsonl", rows), texts


def test_url_and_minhash_stages(tmp_path: Path) -> None:
    path, _ = corpus(tmp_path)
    rep = dedup_text([path], tmp_path / "out", cfg(stages=("url", "minhash")))
    out_ids = [r["id"] for r in read_parts(rep["output_parts"])]
    removed = {"d0", "d1-old", "d2-tie", "d3-nots", "d5-near", "d6-copy"}
    assert out_ids == [i for i in [f"d{i}" for i in range(20)] + ["d0-new"] if i not in removed]
    assert rep["input_records"] == 26 and rep["output_records"] == 21 - 1
    assert rep["bad_records"] == {"bad_json": 1, "not_an_object": 1, "missing_text": 2}
    assert rep["removed"]["url"] == {"older_url_version": 4}
    assert rep["removed"]["minhash"] == {"near_duplicate": 2}
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    by_id = {r.get("id"): r for r in rejects}
    assert by_id["d5-near"]["reason"] == "near_duplicate" and by_id["d5-near"]["dup_of_ordinal"] == 5
    assert by_id["d1-old"]["reason"] == "older_url_version" and by_id["d1-old"]["stage"] == "url"
    assert sum(r["reason"] in ("bad_json", "not_an_object", "missing_text") for r in rejects) == 4
    assert len(rejects) == 6 + 4


def test_line_dedup_per_bucket(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    rows = []
    for i in range(16):
        lines = [doc(rng, 20), "Accept cookies to continue", doc(rng, 20)]
        if i < 8 and i % 2 == 0:
            lines.append("share this page")  # 4 times in the first bucket of 8, 0 in the second
        if i < 7:
            lines.append("subscribe now")  # 7 times in bucket 0: > 6, removed
        rows.append({"id": i, "text": "\n".join(lines)})
    rows.append({"id": "only-boilerplate", "text": "Accept cookies to continue\n\n  "})
    path = write_jsonl(tmp_path / "lines.jsonl", rows)
    rep = dedup_text([path], tmp_path / "out", cfg(stages=("lines",), line_bucket=8, line_max_repeats=6))
    out = list(read_parts(rep["output_parts"]))
    assert len(rep["output_parts"]) == 3  # buckets of 8, 8, 1 documents
    assert all("Accept cookies" not in r["text"] for r in out[:16])  # 8 per bucket > 6
    assert all("subscribe now" not in r["text"] for r in out[:7])
    assert sum("share this page" in r["text"] for r in out) == 4  # 4 ≤ 6: kept
    assert out[16]["text"].startswith("Accept cookies")  # a bucket of 1: no repeats
    counters = rep["passes"]["lines"]["stage_counters"]["lines"]
    assert counters["lines_removed"] == 16 + 7 and counters["documents_changed"] == 16


def test_empty_after_line_dedup_is_rejected(tmp_path: Path) -> None:
    rows = [{"id": i, "text": "menu\nhome"} for i in range(8)] + [{"id": "x", "text": "menu\nunique line"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    rep = dedup_text([path], tmp_path / "out", cfg(stages=("lines",), line_bucket=100))
    assert rep["removed"]["lines"] == {"empty_after_line_dedup": 8}
    assert [r["text"] for r in read_parts(rep["output_parts"])] == ["unique line"]


def test_full_pipeline_resumes_after_a_crash(tmp_path: Path, monkeypatch) -> None:
    path, _ = corpus(tmp_path)
    full = dedup_text([path], tmp_path / "ref", cfg())
    want = list(read_parts(full["output_parts"]))

    calls = {"n": 0}
    original = MinHashDedup.process

    def crashing(self, rec, ordinal):
        calls["n"] += 1
        if ordinal == 16:
            raise KeyboardInterrupt("killed")
        return original(self, rec, ordinal)

    monkeypatch.setattr(MinHashDedup, "process", crashing)
    with pytest.raises(KeyboardInterrupt):
        dedup_text([path], tmp_path / "out", cfg())
    state = tmp_path / "out" / "_work" / "pass_dedup"
    assert len(list(state.glob("ckpt-*.json"))) == 2  # chunks 0 and 1 (7 input records each) finished
    assert not list((tmp_path / "out").rglob("*.tmp"))  # the interrupted chunk left no partial file
    # A kill between saving chunk 2's state and its checkpoint: the stale state must be ignored.
    (state / "state-00002.pkl").write_bytes(b"garbage from an interrupted run")

    monkeypatch.setattr(
        MinHashDedup,
        "process",
        lambda self, rec, o: (calls.__setitem__("n", calls["n"] + 1), original(self, rec, o))[1],
    )
    calls["n"] = 0
    rep = dedup_text([path], tmp_path / "out", cfg())
    assert calls["n"] < 16  # only documents after the checkpoint were processed again
    assert list(read_parts(rep["output_parts"])) == want
    assert rep["removed"] == full["removed"] and rep["bad_records"] == full["bad_records"]
    assert len(read_jsonl(tmp_path / "out" / "rejects.jsonl")) == len(
        read_jsonl(tmp_path / "ref" / "rejects.jsonl")
    )

    calls["n"] = 0
    dedup_text([path], tmp_path / "out", cfg())  # finished: nothing is processed again
    assert calls["n"] == 0


def test_parquet_in_and_out(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path, _ = corpus(tmp_path)
    good = [r for r in read_jsonl(path) if isinstance(r.get("text"), str)]
    cols = {k: [str(r.get(k, "")) for r in good] for k in ("id", "text", "url", "timestamp")}
    pq.write_table(pa.table(cols), tmp_path / "in.parquet", row_group_size=4)
    rep = dedup_text(
        [tmp_path / "in.parquet"], tmp_path / "out", cfg(stages=("url", "minhash"), out_format="parquet")
    )
    assert all(p.endswith(".parquet") for p in rep["output_parts"])
    ref = dedup_text([path], tmp_path / "ref", cfg(stages=("url", "minhash")))
    assert [r["id"] for r in read_parts(rep["output_parts"])] == [
        r["id"] for r in read_parts(ref["output_parts"])
    ]
    # Resumable positions inside parquet: start at row 9 of a file with row groups of 4.
    rows = [it.record["id"] for it in RecordReader([tmp_path / "in.parquet"]).iter_from((0, 9))]
    assert rows == cols["id"][9:]


def test_config_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError):
        dedup_text([path], tmp_path / "o", cfg(stages=("bogus",)))
    with pytest.raises(FileNotFoundError):
        dedup_text([tmp_path / "missing.jsonl"], tmp_path / "o", cfg())
    assert json.loads(json.dumps(cfg().__dict__, default=str))["line_max_repeats"] == 6
