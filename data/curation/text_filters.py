"""Heuristic document filters (paper §3.1.1, "Heuristic filtering").

* Duplicated n-gram coverage (Rae et al., 2021, Gopher): for n in 5..10, the fraction of word
  characters covered by n-grams that occur more than once in the document; a document over the
  threshold for any n is mostly repeated content (logs, error messages, boilerplate).
* Dirty-word count (Raffel et al., 2020, C4): occurrences of words / phrases from a user-given list;
  more than `max_dirty_words` removes the document (C4 removes on the first: the default 0).
* Token-distribution KL divergence: KL(p_doc ‖ q_ref) between the document's word distribution
  and a reference distribution (word counts of the training corpus, add-α smoothed so unseen words
  get a small probability); documents full of outlier tokens score high and are removed.
The first failing check is the document's `reason` in rejects; the report counts reasons.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.data.curation.language_id import LanguageIdConfig, LanguageIdStage, language_report
from herd.data.curation.text_pipeline import BaseStage, Verdict, concat_rejects, run_pass, validate
from herd.data.records import RecordReader, atomic_write_json

_WORD = re.compile(r"\w+", re.UNICODE)

# Gopher's thresholds: max fraction of characters in duplicated n-grams, per n.
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def dup_ngram_coverage(ws: list[str], n: int) -> float:
    """Fraction of word characters inside n-grams that occur ≥2 times (overlaps counted once)."""
    total = sum(len(w) for w in ws)
    if total == 0 or len(ws) < n:
        return 0.0
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(ws))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(ws, covered) if c) / total


def dirty_word_count(ws: list[str], phrases: Iterable[tuple[str, ...]]) -> int:
    """Occurrences of dirty words / phrases (tuples of lower-case words) in a word list."""
    by_len: dict[int, set[tuple[str, ...]]] = {}
    for p in phrases:
        by_len.setdefault(len(p), set()).add(p)
    n = 0
    for k, ps in by_len.items():
        n += sum(1 for i in range(len(ws) - k + 1) if tuple(ws[i : i + k]) in ps)
    return n


@dataclass
class ReferenceDistribution:
    """Word counts of a reference corpus; q(w) = (c(w) + α) / (C + α (V + 1)), V+1 for 'unseen'."""

    counts: Mapping[str, int]
    alpha: float = 1.0
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = int(sum(self.counts.values()))
        self._denom = self.total + self.alpha * (len(self.counts) + 1)

    def prob(self, w: str) -> float:
        return (self.counts.get(w, 0) + self.alpha) / self._denom

    @classmethod
    def from_texts(cls, texts: Iterable[str], alpha: float = 1.0) -> ReferenceDistribution:
        c: Counter = Counter()
        for t in texts:
            c.update(words(t))
        return cls(dict(c), alpha)

    @classmethod
    def load(cls, path: str | Path, text_field: str = "text", alpha: float = 1.0) -> ReferenceDistribution:
        """A .json {word: count} file, or a jsonl/parquet corpus whose words are counted (streamed)."""
        path = Path(path)
        if path.suffix == ".json":
            return cls({str(k): int(v) for k, v in json.loads(path.read_text()).items()}, alpha)
        texts = (
            it.record[text_field] for it in RecordReader([path]) if validate(it, text_field)[0] is not None
        )
        return cls.from_texts(texts, alpha)


def token_kl(ws: list[str], ref: ReferenceDistribution) -> float:
    """KL(p_doc ‖ q_ref) in nats, p_doc the empirical word distribution of the document."""
    if not ws:
        return 0.0
    c = Counter(ws)
    n = len(ws)
    return sum((k / n) * math.log((k / n) / ref.prob(w)) for w, k in c.items())


@dataclass
class FilterConfig:
    text_field: str = "text"
    dup_ngram_thresholds: dict[int, float] = field(default_factory=lambda: dict(GOPHER_DUP_NGRAM))
    dirty_words: list[str] = field(default_factory=list)  # words or phrases, case-insensitive
    max_dirty_words: int = 0
    reference: ReferenceDistribution | None = None
    max_kl: float | None = None  # None: KL check off
    min_words: int = 1
    language: LanguageIdConfig | None = None  # None: no language identification stage
    chunk_size: int = 100_000
    out_format: str = "jsonl"
    write_rejects: bool = True
    progress: bool = True


class HeuristicFilter(BaseStage):
    name = "heuristics"

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg
        self.phrases = [tuple(words(p)) for p in cfg.dirty_words if words(p)]

    def check(self, text: str) -> tuple[str | None, dict[str, Any] | None]:
        """(reason, detail) of the first failing check, or (None, None)."""
        cfg = self.cfg
        ws = words(text)
        if len(ws) < cfg.min_words:
            return "too_few_words", {"words": len(ws)}
        for n, limit in sorted(cfg.dup_ngram_thresholds.items()):
            cov = dup_ngram_coverage(ws, n)
            if cov > limit:
                return "dup_ngram_coverage", {"n": n, "coverage": round(cov, 4), "limit": limit}
        if self.phrases:
            dirty = dirty_word_count(ws, self.phrases)
            if dirty > cfg.max_dirty_words:
                return "dirty_words", {"dirty_words": dirty}
        if cfg.reference is not None and cfg.max_kl is not None:
            kl = token_kl(ws, cfg.reference)
            if kl > cfg.max_kl:
                return "token_kl", {"kl": round(kl, 4), "limit": cfg.max_kl}
        return None, None

    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict:
        reason, detail = self.check(rec[self.cfg.text_field])
        return (None, reason, detail) if reason else (rec, None, None)


def filter_text(inputs: list[str | Path], out_dir: str | Path, cfg: FilterConfig) -> dict[str, Any]:
    """Stream inputs through language identification (when configured) and the heuristic filters
    (resumable per chunk); writes parts + report."""
    out = Path(out_dir)
    stages: list[BaseStage] = [HeuristicFilter(cfg)]
    if cfg.language is not None:
        stages.insert(0, LanguageIdStage(cfg.language, cfg.text_field))
    totals = run_pass(
        RecordReader(inputs), stages, out, out / "_work" / "pass_filter",
        text_field=cfg.text_field, chunk_size=cfg.chunk_size, out_format=cfg.out_format,
        write_rejects=cfg.write_rejects, progress=cfg.progress, label="filter",
    )  # fmt: skip
    report: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "input_records": totals["input_records"],
        "output_records": totals["output_records"],
        "bad_records": totals["bad_records"],
        "removed": totals["removed"],
        "output_parts": totals["parts"],
        "seconds_this_run": totals["seconds_this_run"],
        "docs_per_s_this_run": totals["docs_per_s_this_run"],
        "config": {
            "dup_ngram_thresholds": cfg.dup_ngram_thresholds, "dirty_words": len(cfg.dirty_words),
            "max_dirty_words": cfg.max_dirty_words, "max_kl": cfg.max_kl, "min_words": cfg.min_words,
        },
    }  # fmt: skip
    if cfg.language is not None:
        lang = cfg.language
        report["languages"] = language_report(totals["stage_counters"].get("language_id", {}))
        report["config"]["language"] = {"keep": lang.keep, "min_confidence": lang.min_confidence,
                                        "candidates": lang.candidates, "low_accuracy": lang.low_accuracy}  # fmt: skip
    if cfg.write_rejects:
        report["rejects"] = concat_rejects(totals["rejects_parts"], out / "rejects.jsonl")
    atomic_write_json(out / "report.json", report)
    return report
