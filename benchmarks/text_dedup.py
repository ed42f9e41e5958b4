"""Benchmark: MinHash-LSH document dedup throughput vs plain datasketch on one synthetic corpus (JSON).

    .venv/bin/python benchmarks/text_dedup.py --docs 20000

Corpus: documents of ~`--words` Zipf-distributed words; a fraction are near-duplicates of an
earlier document (a few percent of words replaced). Compared on the same documents, same shingles
(word 5-grams), same num_perm and LSH threshold:
  * datasketch_update: the textbook loop — `MinHash.update(shingle)` per shingle, then
    `lsh.query` / `lsh.insert`;
  * datasketch_update_batch: the same with `MinHash.update_batch(shingles)`;
  * herd_stage: herd.data's MinHashDedup stage (cached word hashes, vectorised shingles and
    permutations, datasketch's MinHashLSH);
  * herd_pipeline: `herd data dedup-text` end to end (jsonl in/out, checkpoints, rejects), MinHash only
    and all three stages.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+")


def make_corpus(n: int, words: int, dup_frac: float, seed: int) -> tuple[list[dict], set[int]]:
    """Documents + the ids of planted near-duplicates (copies of an earlier document, ~1% words replaced,
    so shingle Jaccard ≈ 0.9: clearly above the 0.8 LSH threshold)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"tok{i}" for i in range(50_000)])
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    docs: list[dict] = []
    planted: set[int] = set()
    for i in range(n):
        if docs and rng.random() < dup_frac:
            src = docs[int(rng.integers(len(docs)))]["text"].split()
            for j in rng.choice(len(src), max(1, int(0.01 * len(src))), replace=False):
                src[j] = str(rng.choice(vocab, p=p))
            text = " ".join(src)
            planted.add(i)
        else:
            text = " ".join(rng.choice(vocab, int(rng.integers(words // 2, words * 3 // 2)), p=p))
        docs.append({"id": i, "text": text, "url": f"https://example.org/{i}", "timestamp": i})
    return docs, planted


def shingles(text: str, k: int) -> list[bytes]:
    w = _WORD.findall(text.lower())
    if len(w) < k:
        return [" ".join(w).encode()] if w else []
    return [" ".join(w[i : i + k]).encode() for i in range(len(w) - k + 1)]


def run_datasketch(docs: list[dict], num_perm: int, k: int, t: float, batch: bool) -> tuple[float, set[int]]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=t, num_perm=num_perm)
    removed: set[int] = set()
    t0 = time.perf_counter()
    for d in docs:
        m = MinHash(num_perm=num_perm)
        sh = shingles(d["text"], k)
        if batch:
            m.update_batch(sh)
        else:
            for s in sh:
                m.update(s)
        if lsh.query(m):
            removed.add(d["id"])
        else:
            lsh.insert(d["id"], m)
    return time.perf_counter() - t0, removed


def run_stage(docs: list[dict], num_perm: int, k: int, t: float) -> tuple[float, set[int]]:
    from herd.data.curation.text_dedup import MinHashDedup

    stage = MinHashDedup("text", num_perm=num_perm, shingle_size=k, threshold=t)
    removed: set[int] = set()
    t0 = time.perf_counter()
    for i, d in enumerate(docs):
        rec, _, _ = stage.process(d, i)
        if rec is None:
            removed.add(d["id"])
    return time.perf_counter() - t0, removed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--dup-frac", type=float, default=0.1)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--shingle-size", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from herd.data.curation.text_dedup import TextDedupConfig, dedup_text
    from herd.data.records import write_jsonl

    docs, planted = make_corpus(args.docs, args.words, args.dup_frac, args.seed)
    n = len(docs)
    res: dict = {"docs": n, "mean_words": float(np.mean([len(d["text"].split()) for d in docs])),
                 "num_perm": args.num_perm, "shingle_size": args.shingle_size, "threshold": args.threshold}  # fmt: skip
    base_s, base_removed = run_datasketch(docs, args.num_perm, args.shingle_size, args.threshold, batch=False)
    batch_s, batch_removed = run_datasketch(
        docs, args.num_perm, args.shingle_size, args.threshold, batch=True
    )
    ours_s, ours_removed = run_stage(docs, args.num_perm, args.shingle_size, args.threshold)
    res["datasketch_update_docs_per_s"] = round(n / base_s, 1)
    res["datasketch_update_batch_docs_per_s"] = round(n / batch_s, 1)
    res["herd_stage_docs_per_s"] = round(n / ours_s, 1)
    res["speedup_vs_datasketch_update"] = round(base_s / ours_s, 2)
    res["speedup_vs_datasketch_update_batch"] = round(batch_s / ours_s, 2)
    res["planted_near_duplicates"] = len(planted)
    res["removed"] = {"datasketch": len(base_removed), "herd": len(ours_removed)}
    res["planted_recall"] = {
        "datasketch": round(len(base_removed & planted) / max(1, len(planted)), 4),
        "herd": round(len(ours_removed & planted) / max(1, len(planted)), 4),
    }
    union = base_removed | ours_removed
    res["removed_agreement_jaccard"] = (
        round(len(base_removed & ours_removed) / len(union), 4) if union else 1.0
    )

    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "corpus.jsonl"
        write_jsonl(inp, docs)
        for name, stages in (
            ("herd_pipeline_minhash", ("minhash",)),
            ("herd_pipeline_all", ("url", "minhash", "lines")),
        ):
            cfg = TextDedupConfig(stages=stages, num_perm=args.num_perm, shingle_size=args.shingle_size,
                                  lsh_threshold=args.threshold, chunk_size=5000, progress=False)  # fmt: skip
            t0 = time.perf_counter()
            rep = dedup_text([inp], Path(tmp) / name, cfg)
            res[f"{name}_docs_per_s"] = round(n / (time.perf_counter() - t0), 1)
            res[f"{name}_output_records"] = rep["output_records"]
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
