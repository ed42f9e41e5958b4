"""The Llama 3 paper's contamination analysis (§5.1): 8-gram overlap of evaluation examples with a corpus.

An example's tokens are *covered* when they lie inside an 8-gram (of the corpus's tokenizer) that occurs
at least once in the training corpus; the example is contaminated when its covered fraction reaches a
threshold (the paper picks one per benchmark; 0.5 here by default). Reported: the contaminated fraction
per task and, when per-example scores are given, the score on the clean and on the contaminated subset.

Streaming: only the evaluation side's 8-grams are held in memory (as sorted 64-bit hashes); the corpus
is read in blocks, a token-shard folder (`herd data tokenize`) by memory-mapped slices overlapping by 7
tokens, a jsonl corpus document by document, so a corpus larger than RAM costs one pass and no memory.
A block's 8-grams are hashed with numpy (a polynomial hash mod 2^64 with a final mix) and looked up
with `searchsorted`; two different 8-grams sharing a hash is possible but ~N²/2^64 unlikely.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NGRAM = 8
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the polynomial hash
BLOCK_TOKENS = 1 << 22  # tokens per memory-mapped slice of a shard


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """tokens (T,) → uint64 hashes (T-n+1,) of every n-gram (empty when T < n)."""
    t = np.asarray(tokens).astype(np.uint64)
    count = len(t) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros(count, dtype=np.uint64)
        for k in range(n):
            h = h * _MULT + t[k : k + count] + np.uint64(1)
        h ^= h >> np.uint64(31)  # mix the high bits down: neighbouring n-grams differ in low bits too
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


@dataclass
class ExampleOverlap:
    tokens: int  # tokens of the example
    covered: int  # of which inside an 8-gram found in the corpus
    contaminated: bool

    @property
    def fraction(self) -> float:
        return self.covered / self.tokens if self.tokens else 0.0


@dataclass
class NgramIndex:
    """The evaluation examples' n-grams, and which of them the corpus has shown so far."""

    examples: list[np.ndarray]  # per example: its n-gram hashes (T_i - n + 1,)
    lengths: list[int]
    unique: np.ndarray  # sorted distinct hashes (U,)
    seen: np.ndarray = field(init=False)  # (U,) bool
    corpus_tokens: int = 0

    def __post_init__(self) -> None:
        self.seen = np.zeros(len(self.unique), dtype=bool)

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[int]], n: int = NGRAM) -> NgramIndex:
        hashes = [ngram_hashes(np.asarray(t, dtype=np.int64), n) for t in token_lists]
        unique = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, np.uint64)
        return cls(hashes, [len(t) for t in token_lists], unique)

    def scan(self, tokens: np.ndarray, n: int = NGRAM) -> None:
        """Mark the example n-grams that occur in `tokens` (T,); a block boundary must overlap n-1."""
        if len(self.unique) == 0:
            return
        h = ngram_hashes(tokens, n)
        pos = np.searchsorted(self.unique, h)
        pos[pos == len(self.unique)] = 0
        self.seen[pos[self.unique[pos] == h]] = True

    def overlaps(self, threshold: float, n: int = NGRAM) -> list[ExampleOverlap]:
        out = []
        for hashes, length in zip(self.examples, self.lengths):
            covered = np.zeros(length, dtype=bool)
            if len(hashes):
                hit = self.seen[np.searchsorted(self.unique, hashes)]  # (T_i - n + 1,)
                for start in np.flatnonzero(hit):
                    covered[start : start + n] = True
            count = int(covered.sum())
            out.append(ExampleOverlap(length, count, length > 0 and count / length >= threshold))
        return out


def shard_blocks(directory: str | Path, n: int = NGRAM, block: int = BLOCK_TOKENS) -> Iterator[np.ndarray]:
    """A token-shard folder as memory-mapped blocks, each overlapping the previous one by n-1 tokens
    (documents never span shards, so shards are scanned independently)."""
    from herd.data.training.token_shards import read_manifest

    root = Path(directory)
    manifest = read_manifest(root)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for shard in manifest["shards"]:
        size = int(shard["num_tokens"])
        if size == 0:
            continue
        tokens = np.memmap(root / shard["tokens"], dtype=dtype, mode="r", shape=(size,))
        for start in range(0, size, block):
            yield np.asarray(tokens[max(0, start - (n - 1)) : start + block])
        del tokens


def jsonl_blocks(paths: Iterable[str | Path], tokenizer: Any, text_field: str = "text",
                 skipped: Any = None) -> Iterator[np.ndarray]:  # fmt: skip
    """Each document of jsonl files, tokenised (no BOS/EOS: an n-gram never spans two documents)."""
    from herd.data.training.text_sources import iter_documents

    for doc in iter_documents("jsonl", list(paths), text_field, skipped):
        yield np.asarray(tokenizer.encode(doc, bos=False, eos=False), dtype=np.int64)


def clean_vs_contaminated(
    overlaps: Sequence[ExampleOverlap], scores: Sequence[float] | None
) -> dict[str, Any]:
    """Counts, contaminated fraction, and mean score on each subset (None where a subset is empty)."""
    dirty = [o.contaminated for o in overlaps]
    summary: dict[str, Any] = {
        "examples": len(overlaps),
        "contaminated": sum(dirty),
        "contaminated_fraction": sum(dirty) / len(overlaps) if overlaps else 0.0,
        "mean_overlap": float(np.mean([o.fraction for o in overlaps])) if overlaps else 0.0,
    }
    if scores is not None:
        clean = [s for s, d in zip(scores, dirty) if not d]
        bad = [s for s, d in zip(scores, dirty) if d]
        summary["score_all"] = float(np.mean(scores)) if scores else None
        summary["score_clean"] = float(np.mean(clean)) if clean else None
        summary["score_contaminated"] = float(np.mean(bad)) if bad else None
    return summary


__all__ = [
    "ExampleOverlap",
    "NGRAM",
    "NgramIndex",
    "clean_vs_contaminated",
    "jsonl_blocks",
    "ngram_hashes",
    "shard_blocks",
]
