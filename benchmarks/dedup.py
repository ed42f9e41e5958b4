"""Benchmark: near-duplicate search on random unit vectors with planted duplicate groups (prints JSON).

    .venv/bin/python benchmarks/dedup.py --n 1000000          # the numbers in docs/data.md

Data: n random 512-d unit vectors; a fraction of them are rewritten as planted duplicate groups
(2–10 members, each member = base + Gaussian noise scaled so its cosine to the base is uniform in
[c_min, 0.995]). Random 512-d vectors are the hard case for clustering (no structure for k-means to
exploit), so recall here is a pessimistic estimate for real SSCD descriptors.

Reference ("exact"): brute-force range search (faiss IndexFlatIP, the same BLAS kernel) for a random
sample of queries; its time extrapolates linearly to all n queries, halved for the symmetry of
all-pairs search (the conservative baseline). Recall is measured on the planted pairs above the
threshold plus every exact neighbour pair of the sampled queries.
Not part of the test suite.
"""

from __future__ import annotations

import os

# Two OpenMP runtimes (faiss's and torch's) spinning on 2 cores slow each other; sleep when idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_data(
    n: int, d: int, dup_frac: float, c_min: float, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for r0 in range(0, n, 65536):
        b = rng.standard_normal((min(65536, n - r0), d), dtype=np.float32)
        x[r0 : r0 + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    perm = rng.permutation(n)
    groups, used = [], 0
    budget = int(n * dup_frac)
    while used < budget:
        size = int(rng.integers(2, 11))
        g = np.sort(perm[used : used + size])
        used += size
        base = x[g[0]].copy()
        cos = rng.uniform(c_min, 0.995, size - 1)
        sigma = np.sqrt(1.0 / cos**2 - 1.0)  # ‖noise‖ = σ → cos(base, base+noise) ≈ 1/√(1+σ²)
        noise = rng.standard_normal((size - 1, d), dtype=np.float32) * (sigma[:, None] / np.sqrt(d))
        y = base + noise
        x[g[1:]] = y / np.linalg.norm(y, axis=1, keepdims=True)
        groups.append(g)
    return x, groups


def planted_pairs(x: np.ndarray, groups: list[np.ndarray], t: float) -> np.ndarray:
    n = len(x)
    keys = []
    for g in groups:
        s = x[g] @ x[g].T
        a, b = np.nonzero(np.triu(s >= t, 1))
        keys.append(g[a] * n + g[b])
    return np.concatenate(keys) if keys else np.zeros(0, np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dup-frac", type=float, default=0.1, help="fraction of vectors in planted groups")
    ap.add_argument("--c-min", type=float, default=0.85, help="lowest planted cosine to the group base")
    ap.add_argument("--threshold", type=float, default=0.75, help="SSCD's 90%%-precision copy threshold")
    ap.add_argument("--method", default="clusters", choices=["clusters", "ivf"])
    ap.add_argument("--n-clusters", type=int, default=None)
    ap.add_argument("--nprobe-assign", type=int, default=2)
    ap.add_argument("--refine-passes", type=int, default=2)
    ap.add_argument("--kmeans-iters", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--exact-queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from herd.data.curation.near_dup_search import SearchConfig, exact_neighbors, find_pairs

    t0 = time.perf_counter()
    x, groups = make_data(args.n, args.d, args.dup_frac, args.c_min, args.seed)
    gen_s = time.perf_counter() - t0
    rss_data = rss_mb()

    cfg = SearchConfig(
        threshold=args.threshold, method=args.method, n_clusters=args.n_clusters,
        nprobe_assign=args.nprobe_assign, nprobe=args.nprobe, seed=args.seed,
        refine_passes=args.refine_passes, kmeans_iters=args.kmeans_iters,
    )  # fmt: skip
    t0 = time.perf_counter()
    found = find_pairs(x, cfg)
    ours_s = time.perf_counter() - t0
    rss_search = rss_mb()

    rng = np.random.default_rng(args.seed + 1)
    q = np.sort(rng.choice(args.n, min(args.exact_queries, args.n), replace=False))
    t0 = time.perf_counter()
    sampled = exact_neighbors(x, q, args.threshold)
    exact_q_s = time.perf_counter() - t0
    exact_full_s = exact_q_s * args.n / len(q)
    exact_half_s = exact_full_s / 2  # all-pairs only needs i < j

    n = args.n
    ref = np.union1d(planted_pairs(x, groups, args.threshold), sampled.keys(n))
    got = found.keys(n)
    hit = np.isin(ref, got)
    planted = planted_pairs(x, groups, args.threshold)
    result = {
        "n": n, "d": args.d, "threshold": args.threshold, "method": args.method,
        "planted_groups": len(groups), "planted_pairs": len(planted),
        "reference_pairs": len(ref), "pairs_found": len(found),
        "pair_recall": float(hit.mean()) if len(ref) else 1.0,
        "planted_pair_recall": float(np.isin(planted, got).mean()) if len(planted) else 1.0,
        "ours_s": round(ours_s, 2),
        "exact_sample_queries": len(q), "exact_sample_s": round(exact_q_s, 2),
        "exact_all_pairs_s_extrapolated": round(exact_half_s, 1),
        "speedup_vs_exact": round(exact_half_s / ours_s, 1),
        "peak_rss_mb_after_data": round(rss_data, 1), "peak_rss_mb_after_search": round(rss_search, 1),
        "search_stats": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in found.stats.items()},
        "data_gen_s": round(gen_s, 1), "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
    }  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
