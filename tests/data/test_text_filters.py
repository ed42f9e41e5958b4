"""Heuristic filters: duplicated n-gram coverage, dirty words, token KL; reasons in report and rejects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import write_jsonl

from herd.data.curation.text_filters import (
    FilterConfig,
    HeuristicFilter,
    ReferenceDistribution,
    dirty_word_count,
    dup_ngram_coverage,
    filter_text,
    token_kl,
    words,
)
from herd.data.records import read_jsonl, read_parts


def test_dup_ngram_coverage() -> None:
    assert dup_ngram_coverage(words("error at line five " * 10), 5) == 1.0
    assert dup_ngram_coverage(words("one two three four five six seven"), 2) == 0.0
    # "a b" occurs twice: words 0,1 and 3,4 covered → chars (1+1+1+1) of (1+1+3+1+1).
    assert dup_ngram_coverage(["a", "b", "ccc", "a", "b"], 2) == pytest.approx(4 / 7)
    assert dup_ngram_coverage(["a", "b"], 5) == 0.0


def test_dirty_words_and_phrases() -> None:
    ws = words("This BAD page has bad words and a very naughty phrase, bad.")
    assert dirty_word_count(ws, [("bad",)]) == 3
    assert dirty_word_count(ws, [("bad",), ("naughty", "phrase"), ("absent",)]) == 4


def test_token_kl_hand_computed() -> None:
    ref = ReferenceDistribution({"a": 6, "b": 2}, alpha=1.0)  # denominator 8 + 1·3 = 11
    assert ref.prob("a") == pytest.approx(7 / 11) and ref.prob("zzz") == pytest.approx(1 / 11)
    want = (
        0.5 * math.log(0.5 / (7 / 11)) + 0.25 * math.log(0.25 / (3 / 11)) + 0.25 * math.log(0.25 / (1 / 11))
    )
    assert token_kl(["a", "a", "b", "q"], ref) == pytest.approx(want)
    assert token_kl([], ref) == 0.0


def test_kl_separates_outlier_documents() -> None:
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(200)]
    p = 1 / np.arange(1, 201)
    p /= p.sum()  # Zipf
    ref = ReferenceDistribution.from_texts([" ".join(rng.choice(vocab, 2000, p=p)) for _ in range(20)])
    normal = [token_kl(words(" ".join(rng.choice(vocab, 300, p=p))), ref) for _ in range(20)]
    junk = [token_kl(words(" ".join(f"x{rng.integers(1e6)}" for _ in range(300))), ref) for _ in range(20)]
    assert max(normal) < 1.0 < 3.0 < min(junk)


def test_filter_text_reasons(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(100)]

    def normal() -> str:
        return " ".join(rng.choice(vocab, 200))

    ref_path = tmp_path / "ref.json"
    ref_path.write_text(json.dumps({w: 10 for w in vocab}))
    rows: list = [{"id": f"ok{i}", "text": normal()} for i in range(5)]
    rows.append({"id": "log", "text": "ERROR connection refused retrying now\n" * 30})
    rows.append({"id": "dirty", "text": normal() + " naughty stuff"})
    rows.append({"id": "outlier", "text": " ".join(f"q{i}" for i in range(150))})
    rows.append({"id": "empty", "text": "  ... "})
    rows += ["{bad", {"id": "notext"}]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = FilterConfig(dirty_words=["naughty stuff"], reference=ReferenceDistribution.load(ref_path),
                       max_kl=1.0, chunk_size=4, progress=False)  # fmt: skip
    rep = filter_text([path], tmp_path / "out", cfg)
    assert [r["id"] for r in read_parts(rep["output_parts"])] == [f"ok{i}" for i in range(5)]
    assert rep["removed"]["heuristics"] == {
        "dup_ngram_coverage": 1,
        "dirty_words": 1,
        "token_kl": 1,
        "too_few_words": 1,
    }
    assert rep["bad_records"] == {"bad_json": 1, "missing_text": 1}
    rejects = {r.get("id"): r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl")}
    assert rejects["log"]["reason"] == "dup_ngram_coverage" and rejects["log"]["n"] == 5
    assert rejects["outlier"]["reason"] == "token_kl" and rejects["outlier"]["kl"] > 1.0
    assert rejects["dirty"]["dirty_words"] == 1
    # Disabled checks let everything with words through.
    lax = HeuristicFilter(FilterConfig(dup_ngram_thresholds={}, progress=False))
    assert lax.check("ERROR again " * 50) == (None, None)


def test_reference_from_corpus(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a a b"}, {"text": "b c"}, "{bad"])
    ref = ReferenceDistribution.load(path)
    assert dict(ref.counts) == {"a": 2, "b": 2, "c": 1} and ref.total == 5
