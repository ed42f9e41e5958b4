"""n-gram resampling of image-text pairs for diversity (paper §7.1, after MetaCLIP / word2vec subsampling).

1. Vocabulary: the 1..max_n-grams of a given list of high-quality texts (e.g. Wikipedia titles).
2. Frequencies: f(g) = number of captions containing vocabulary n-gram g (each caption counts an
   n-gram once: a caption repeating a word is not more "popular").
3. Per pair, with the vocabulary n-grams g_1..g_m of its caption:
     keep if some f(g_i) < T (a rare concept: always kept), else keep if any g_i is sampled, each
     independently with probability √(T / f(g_i)). Hence P(keep) = 1 − Π_i (1 − min(1, √(T/f_i))).
   Captions with no vocabulary n-gram are dropped unless `keep_unmatched` (MetaCLIP drops them).
Randomness is a hash of (seed, record key, n-gram), not a stateful RNG: the decision for a record
does not depend on order, sharding or how many records came before it — deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from herd.data.records import atomic_write, atomic_write_json, dumps, iter_jsonl

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], max_n: int) -> set[str]:
    """All distinct 1..max_n-grams of a token list, space-joined."""
    out: set[str] = set()
    for n in range(1, max_n + 1):
        for i in range(len(tokens) - n + 1):
            out.add(" ".join(tokens[i : i + n]))
    return out


def build_vocabulary(texts: Iterable[str], max_n: int = 3, min_count: int = 1) -> set[str]:
    """n-gram vocabulary of high-quality texts; n-grams seen in fewer than `min_count` texts are dropped."""
    c: Counter = Counter()
    for t in texts:
        c.update(ngrams(tokenize(t), max_n))
    return {g for g, k in c.items() if k >= min_count}


def caption_ngrams(caption: str, vocab: set[str], max_n: int) -> set[str]:
    return ngrams(tokenize(caption), max_n) & vocab


def count_ngrams(captions: Iterable[str], vocab: set[str], max_n: int) -> Counter:
    """f(g): number of captions containing vocabulary n-gram g."""
    f: Counter = Counter()
    for cap in captions:
        f.update(caption_ngrams(cap, vocab, max_n))
    return f


def keep_probability(freqs: Iterable[int], threshold: float) -> float:
    """Closed form P(keep) for a caption whose vocabulary n-grams have frequencies `freqs`."""
    freqs = list(freqs)
    if not freqs:
        return 0.0
    if any(f < threshold for f in freqs):
        return 1.0
    miss = 1.0
    for f in freqs:
        miss *= 1.0 - min(1.0, math.sqrt(threshold / f))
    return 1.0 - miss


def hash_uniform(seed: int, key: str, gram: str) -> float:
    """Deterministic uniform in [0, 1) from (seed, record key, n-gram)."""
    h = hashlib.blake2b(f"{seed}\x1f{key}\x1f{gram}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def keep_pair(
    grams: Iterable[str],
    freqs: Mapping[str, int],
    threshold: float,
    seed: int,
    key: str,
    keep_unmatched: bool = False,
) -> bool:
    grams = sorted(grams)  # iteration order of a set must not matter
    if not grams:
        return keep_unmatched
    fs = [freqs.get(g, 0) for g in grams]
    if any(f < threshold for f in fs):
        return True
    return any(hash_uniform(seed, key, g) < math.sqrt(threshold / f) for g, f in zip(grams, fs))


def _captions(path: Path, text_field: str) -> Iterable[tuple[int, dict[str, Any] | None, str | None]]:
    ordinal = 0
    for it in iter_jsonl(path):
        rec = it.record
        cap = rec.get(text_field) if rec is not None else None
        if rec is None or not isinstance(cap, str):
            yield -1, rec, None
            continue
        yield ordinal, rec, cap
        ordinal += 1


def resample_jsonl(
    captions_path: str | Path,
    out_dir: str | Path,
    vocab: set[str],
    threshold: float,
    *,
    max_n: int = 3,
    text_field: str = "caption",
    id_field: str = "id",
    seed: int = 0,
    keep_unmatched: bool = False,
) -> dict[str, Any]:
    """Two streaming passes over a captions jsonl: count frequencies, then resample. Writes
    kept.jsonl, report.json (counts, kept fraction vs its expectation) and top n-gram counts."""
    path, out = Path(captions_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    freqs = count_ngrams((c for _, _, c in _captions(path, text_field) if c is not None), vocab, max_n)
    counts: Counter = Counter()
    expected = 0.0
    with atomic_write(out / "kept.jsonl") as f:
        for ordinal, rec, cap in _captions(path, text_field):
            if cap is None or rec is None:
                counts["bad_records"] += 1
                continue
            grams = caption_ngrams(cap, vocab, max_n)
            key = str(rec.get(id_field, ordinal))
            p = keep_probability([freqs[g] for g in grams], threshold) if grams else float(keep_unmatched)
            expected += p
            counts["captions"] += 1
            if not grams:
                counts["unmatched"] += 1
            if keep_pair(grams, freqs, threshold, seed, key, keep_unmatched):
                counts["kept"] += 1
                f.write(dumps(rec) + "\n")
    n = counts["captions"]
    report = {
        "captions": n,
        "kept": counts["kept"],
        "kept_fraction": counts["kept"] / n if n else 0.0,
        "expected_kept_fraction": expected / n if n else 0.0,
        "unmatched_captions": counts["unmatched"],
        "bad_records": counts["bad_records"],
        "threshold": threshold,
        "max_n": max_n,
        "vocabulary_size": len(vocab),
        "seed": seed,
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_json(out / "ngram_counts_top.json", dict(freqs.most_common(1000)))
    return report


def read_vocabulary_texts(path: str | Path) -> list[str]:
    """High-quality texts, one per line (e.g. Wikipedia titles, WordNet lemmas)."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
