"""Text deduplication (paper §3.1.1): URL-level, document-level (MinHash LSH) and line-level.

* URL: keep only the newest version of each URL (largest timestamp; ties keep the first seen).
  A streaming pre-pass records (url hash, timestamp, ordinal) in compact arrays — 24 bytes per
  document, never the documents — and marks the winners.
* MinHash: word `shingle_size`-gram shingles, `num_perm` permutations, datasketch `MinHashLSH`
  at `lsh_threshold`; a document whose LSH bands collide with an earlier kept one is removed
  (first seen wins). Shingles are hashed once per distinct word and combined with vectorised numpy,
  and the permutations are applied to all shingles at once — the same affine32 MinHash datasketch
  computes (checked in the tests), several times faster than `MinHash.update` per shingle.
* Lines: inside each bucket of `line_bucket` consecutive documents, lines (stripped, non-empty)
  seen more than `line_max_repeats` times are removed everywhere in the bucket (the paper: >6
  times per 30M documents); a document left without text is removed.
"""

from __future__ import annotations

import hashlib
import math
import re
from array import array
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from herd.data.curation.text_pipeline import BaseStage, Verdict, concat_rejects, run_pass, validate
from herd.data.records import RecordReader, atomic_save_npy, atomic_write_json

_WORD = re.compile(r"\w+", re.UNICODE)
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _h64(s: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


# ---------------------------------------------------------------------------------------------- URL


def normalise_url(url: str) -> str:
    """Scheme and host are case-insensitive; the fragment never reaches the server."""
    u = url.strip().split("#", 1)[0]
    m = re.match(r"^([a-zA-Z][\w+.-]*://)([^/?]*)(.*)$", u)
    return (m.group(1).lower() + m.group(2).lower() + m.group(3)) if m else u


def parse_timestamp(v: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO-8601 string; None if unparseable."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(v.strip()).timestamp()
        except ValueError:
            return None
    return None


def url_winners(
    reader: RecordReader, text_field: str, url_field: str, timestamp_field: str
) -> tuple[np.ndarray, dict[str, int]]:
    """Boolean (n_valid,) per input ordinal: True = kept by URL dedup (newest version, or no URL)."""
    hashes, stamps = array("Q"), array("d")  # compact: no per-document Python objects are kept
    stats: Counter = Counter()
    for it in reader:
        rec, _ = validate(it, text_field)
        if rec is None:
            continue
        url = rec.get(url_field)
        if not isinstance(url, str) or not url.strip():
            hashes.append(0)  # 0 = no URL: never deduplicated
            stamps.append(0.0)
            stats["no_url"] += 1
            continue
        ts = parse_timestamp(rec.get(timestamp_field))
        if ts is None:
            stats["bad_timestamp"] += 1
            ts = -math.inf  # an undated copy loses to any dated one
        hashes.append(_h64(normalise_url(url)) or 1)
        stamps.append(ts)
    h = np.frombuffer(hashes, np.uint64) if len(hashes) else np.zeros(0, np.uint64)
    ts = np.frombuffer(stamps, np.float64) if len(stamps) else np.zeros(0)
    n = len(h)
    order = np.lexsort((np.arange(n), -ts, h))  # by url, newest first, then input order
    first = np.ones(n, bool)
    first[1:] = h[order][1:] != h[order][:-1]
    win = np.zeros(n, bool)
    win[order[first]] = True
    win[h == 0] = True
    stats["documents"] = n
    stats["url_duplicates"] = int((~win).sum())
    return win, dict(stats)


class UrlFilter(BaseStage):
    name = "url"

    def __init__(self, winners: np.ndarray):
        super().__init__()
        self.winners = winners

    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict:
        if ordinal < len(self.winners) and not self.winners[ordinal]:
            return None, "older_url_version", None
        return rec, None, None


# ------------------------------------------------------------------------------------------ MinHash


def _fmix32(h: np.ndarray) -> np.ndarray:
    # MurmurHash3 finalizer, as datasketch's affine32 scheme applies to input hashes.
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class ShingleHasher:
    """32-bit hashes of word k-gram shingles: each distinct word hashed once (cached), k-grams
    combined as a polynomial in the word hashes (uint64 wrap-around), then avalanche-mixed."""

    def __init__(self, shingle_size: int = 5, cache_size: int = 1 << 20):
        self.k = shingle_size
        self.cache: dict[str, int] = {}
        self.cache_size = cache_size
        self._pow = np.array([pow(0x100000001B3, j, 1 << 64) for j in range(shingle_size)], np.uint64)

    def __call__(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        if not words:
            return np.zeros(0, np.uint32)
        if len(self.cache) > self.cache_size:
            self.cache.clear()  # bounded memory; hashes are recomputed deterministically
        c = self.cache
        for w in set(words).difference(c):  # hash each new distinct word once
            c[w] = _h64(w)
        wh = np.array(list(map(c.__getitem__, words)), dtype=np.uint64)  # (T,) C-speed lookups
        k = min(self.k, len(words))  # a document shorter than k is one shingle
        n = len(words) - k + 1
        acc = np.zeros(n, np.uint64)
        with np.errstate(over="ignore"):
            for j in range(k):
                acc += wh[j : j + n] * self._pow[j]  # (n,) one hash per shingle
            return (_fmix64(acc) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def minhash_values(shingle_hashes: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """affine32 MinHash signature (num_perm,) uint32 of a set of 32-bit shingle hashes:
    min over shingles of a_k·fmix32(h) + b_k (mod 2^32), as datasketch `MinHash.update_batch`."""
    a, b = perms[0].astype(np.uint32), perms[1].astype(np.uint32)
    with np.errstate(over="ignore"):
        hv = _fmix32(shingle_hashes.astype(np.uint32))[:, None]  # (s, 1)
        return (hv * a[None, :] + b[None, :]).min(axis=0)  # (num_perm,)


class MinHashDedup(BaseStage):
    name = "minhash"

    def __init__(
        self, text_field: str = "text", num_perm: int = 128, shingle_size: int = 5,
        threshold: float = 0.8, seed: int = 1,
    ):  # fmt: skip
        super().__init__()
        from datasketch import MinHash, MinHashLSH

        self._MinHash = MinHash
        self.text_field, self.num_perm, self.seed = text_field, num_perm, seed
        self.perms = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations  # (2, num_perm)
        self.hasher = ShingleHasher(shingle_size)
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)

    def signature(self, text: str):
        hv = minhash_values(self.hasher(text), self.perms)
        return self._MinHash(
            num_perm=self.num_perm, seed=self.seed, hashvalues=hv, permutations=self.perms, scheme="affine32"
        )

    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict:
        text = rec[self.text_field]
        if not _WORD.search(text):
            self.counters["no_words"] += 1
            return rec, None, None  # nothing to compare; heuristic filters deal with empty documents
        m = self.signature(text)
        dup = self.lsh.query(m)
        if dup:
            return None, "near_duplicate", {"dup_of_ordinal": min(dup)}
        self.lsh.insert(ordinal, m, check_duplication=False)
        return rec, None, None

    def state(self) -> Any:
        return self.lsh

    def load_state(self, state: Any) -> None:
        self.lsh = state


# -------------------------------------------------------------------------------------------- Lines


class LineDedup(BaseStage):
    """Two-pass per bucket: count line occurrences, then drop lines seen > max_repeats times."""

    name = "lines"
    two_pass = True

    def __init__(self, text_field: str = "text", max_repeats: int = 6):
        super().__init__()
        self.text_field, self.max_repeats = text_field, max_repeats
        self.counts: dict[int, int] = {}

    def begin_chunk(self) -> None:
        self.counts = {}  # one bucket = one chunk; hash() is stable within this process

    def observe(self, rec: dict[str, Any]) -> None:
        c = self.counts
        for line in rec[self.text_field].split("\n"):
            s = line.strip()
            if s:
                h = hash(s)
                c[h] = c.get(h, 0) + 1

    def process(self, rec: dict[str, Any], ordinal: int) -> Verdict:
        lines = rec[self.text_field].split("\n")
        kept, dropped = [], 0
        for line in lines:
            s = line.strip()
            if s and self.counts.get(hash(s), 0) > self.max_repeats:
                dropped += 1
                self.counters["chars_removed"] += len(line)
            else:
                kept.append(line)
        if not dropped:
            return rec, None, None
        self.counters["lines_removed"] += dropped
        self.counters["documents_changed"] += 1
        text = "\n".join(kept)
        if not text.strip():
            return None, "empty_after_line_dedup", {"lines_removed": dropped}
        return {**rec, self.text_field: text}, None, None


# ------------------------------------------------------------------------------------------- Driver


@dataclass
class TextDedupConfig:
    text_field: str = "text"
    url_field: str = "url"
    timestamp_field: str = "timestamp"
    stages: tuple[str, ...] = ("url", "minhash", "lines")
    num_perm: int = 128
    shingle_size: int = 5
    lsh_threshold: float = 0.8
    seed: int = 1
    line_bucket: int = 30_000_000  # documents per line-dedup bucket (paper: 30M)
    line_max_repeats: int = 6
    chunk_size: int = 100_000  # checkpoint interval of the URL+MinHash pass (input records)
    out_format: str = "jsonl"
    write_rejects: bool = True
    progress: bool = True


def dedup_text(inputs: list[str | Path], out_dir: str | Path, cfg: TextDedupConfig) -> dict[str, Any]:
    """URL → MinHash → line dedup over jsonl/parquet inputs; resumable; writes parts + report."""
    unknown = set(cfg.stages) - {"url", "minhash", "lines"}
    if unknown or not cfg.stages:
        raise ValueError(f"stages must be among url, minhash, lines (got {cfg.stages})")
    out = Path(out_dir)
    work = out / "_work"
    reader = RecordReader(inputs)
    report: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "config": cfg.__dict__ | {"stages": list(cfg.stages)},
    }
    stages: list[Any] = []
    if "url" in cfg.stages:
        win_path = work / "url_winners.npy"
        if win_path.is_file():  # the pre-pass is its own done-marker
            winners = np.load(win_path)
            report["url_pass"] = {"resumed": True}
        else:
            winners, stats = url_winners(reader, cfg.text_field, cfg.url_field, cfg.timestamp_field)
            atomic_save_npy(win_path, winners)
            atomic_write_json(work / "url_stats.json", stats)
            report["url_pass"] = stats
        stages.append(UrlFilter(winners))
    if "minhash" in cfg.stages:
        stages.append(
            MinHashDedup(cfg.text_field, cfg.num_perm, cfg.shingle_size, cfg.lsh_threshold, cfg.seed)
        )
    lines = "lines" in cfg.stages
    common = {"text_field": cfg.text_field, "write_rejects": cfg.write_rejects, "progress": cfg.progress}
    passes: dict[str, Any] = {}
    if stages:
        first_parts = work / "pass_dedup" if lines else out
        passes["dedup"] = run_pass(
            reader, stages, first_parts, work / "pass_dedup", chunk_size=cfg.chunk_size,
            out_format="jsonl" if lines else cfg.out_format, label="dedup", **common,
        )  # fmt: skip
        reader = RecordReader(passes["dedup"]["parts"]) if lines and passes["dedup"]["parts"] else reader
        if lines and not passes["dedup"]["parts"]:
            lines = False  # nothing survived the first pass
    if lines:
        passes["lines"] = run_pass(
            reader, [LineDedup(cfg.text_field, cfg.line_max_repeats)], out, work / "pass_lines",
            chunk_size=cfg.line_bucket, out_format=cfg.out_format, label="lines", **common,
        )  # fmt: skip
    report["passes"] = passes
    first = next(iter(passes.values()))
    last = passes[list(passes)[-1]]
    report["input_records"] = first["input_records"]
    report["bad_records"] = first["bad_records"]
    report["output_records"] = last["output_records"]
    report["removed"] = {name: c for p in passes.values() for name, c in p["removed"].items()}
    report["output_parts"] = last["parts"]
    if cfg.write_rejects:
        parts = [r for p in passes.values() for r in p["rejects_parts"]]
        report["rejects"] = concat_rejects(parts, out / "rejects.jsonl")
    atomic_write_json(out / "report.json", report)
    return report
