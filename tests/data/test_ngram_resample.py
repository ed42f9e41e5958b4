"""n-gram resampling: closed-form keep probability, determinism, frequency counting, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from synthetic_inputs import write_jsonl

from herd.data.curation.ngram_resample import (
    build_vocabulary,
    count_ngrams,
    keep_pair,
    keep_probability,
    ngrams,
    resample_jsonl,
    tokenize,
)


def test_ngrams_and_vocabulary() -> None:
    assert ngrams(tokenize("A cat, a CAT!"), 2) == {"a", "cat", "a cat", "cat a"}
    vocab = build_vocabulary(["red car", "red apple", "blue car"], max_n=2, min_count=1)
    assert vocab == {"red", "car", "apple", "blue", "red car", "red apple", "blue car"}
    assert build_vocabulary(["red car", "red apple", "blue car"], max_n=2, min_count=2) == {"red", "car"}
    # Frequencies count captions, not occurrences.
    f = count_ngrams(["red red car", "a red apple", "green"], vocab, 2)
    assert f == {"red": 2, "car": 1, "red car": 1, "apple": 1, "red apple": 1}


def test_closed_form() -> None:
    assert keep_probability([50, 10_000], 100) == 1.0  # one rare n-gram keeps the pair
    assert keep_probability([], 100) == 0.0
    assert keep_probability([400, 900], 100) == pytest.approx(1 - (1 - 0.5) * (1 - 1 / 3))
    assert keep_probability([100], 100) == 1.0  # f == T: probability √1 = 1


@pytest.mark.parametrize("freqs", [[400], [400, 900], [1600, 2500, 10_000], [10_000] * 5])
def test_kept_fraction_matches_expectation(freqs: list[int]) -> None:
    """Many records with the same synthetic n-gram frequency table: empirical vs 1 − Π(1 − √(T/f))."""
    t = 100.0
    table = {f"g{i}": f for i, f in enumerate(freqs)}
    n = 20_000
    kept = sum(keep_pair(table, table, t, seed=7, key=str(k)) for k in range(n))
    p = 1 - math.prod(1 - math.sqrt(t / f) for f in freqs)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept / n - p) < 5 * sigma + 1e-9, (kept / n, p)


def test_deterministic_per_seed_and_order_free() -> None:
    table = {"a": 900, "b": 1600}
    run = [keep_pair(["a", "b"], table, 100, seed=3, key=str(k)) for k in range(500)]
    assert run == [keep_pair(["b", "a"], table, 100, seed=3, key=str(k)) for k in range(500)]
    other = [keep_pair(["a", "b"], table, 100, seed=4, key=str(k)) for k in range(500)]
    assert run != other
    assert keep_pair([], table, 100, seed=0, key="x") is False
    assert keep_pair([], table, 100, seed=0, key="x", keep_unmatched=True) is True


def test_resample_jsonl_end_to_end(tmp_path: Path) -> None:
    """Captions built so that 'dog' is in 4000, 'cat' in 900 and 'owl' in 30 captions."""
    rng = np.random.default_rng(0)
    rows: list[list[str]] = [["dog"] if i < 4000 else [] for i in range(5000)]
    for i in range(100):
        rows[i].append("cat")  # dog + cat
    for i in range(4000, 4800):
        rows[i].append("cat")  # cat alone
    for i in range(4800, 4830):
        rows[i].append("owl")  # rare
    recs = [
        {"id": f"r{i}", "caption": " ".join(rng.permutation(w).tolist()) or "nothing here"}
        for i, w in enumerate(rows)
    ]
    path = write_jsonl(tmp_path / "caps.jsonl", [*recs, "{broken", {"id": "x"}])
    vocab = build_vocabulary(["dog", "cat", "owl"], max_n=1)
    rep = resample_jsonl(path, tmp_path / "out", vocab, threshold=100, max_n=1, seed=1)
    assert rep["captions"] == 5000 and rep["bad_records"] == 2
    assert rep["unmatched_captions"] == 5000 - 4000 - 800 - 30
    top = json.loads((tmp_path / "out" / "ngram_counts_top.json").read_text())
    assert top == {"dog": 4000, "cat": 900, "owl": 30}
    p_dog, p_cat = math.sqrt(100 / 4000), math.sqrt(100 / 900)
    expected = (3900 * p_dog + 100 * (1 - (1 - p_dog) * (1 - p_cat)) + 800 * p_cat + 30) / 5000
    assert rep["expected_kept_fraction"] == pytest.approx(expected)
    n_kept = rep["kept"]
    sigma = math.sqrt(3900 * p_dog * (1 - p_dog) + 800 * p_cat * (1 - p_cat)) / 5000
    assert abs(n_kept / 5000 - expected) < 5 * sigma
    kept_ids = {r["id"] for r in map(json.loads, (tmp_path / "out" / "kept.jsonl").read_text().splitlines())}
    assert {f"r{i}" for i in range(4800, 4830)} <= kept_ids  # the rare concept is always kept
    assert not kept_ids & {f"r{i}" for i in range(4830, 5000)}  # unmatched captions dropped
    again = resample_jsonl(path, tmp_path / "out2", vocab, threshold=100, max_n=1, seed=1)
    assert again["kept"] == n_kept
    assert (tmp_path / "out2" / "kept.jsonl").read_text() == (tmp_path / "out" / "kept.jsonl").read_text()
