"""All pairs of L2-normalised descriptors with cosine similarity ≥ threshold, and their groups.

Methods (the same code runs on faiss-cpu and faiss-gpu; GPUs are used when `faiss.get_num_gpus()>0`):
  * "clusters" (default): spherical k-means pre-clustering (`faiss.Kmeans` on a sample, then
    `refine_passes` Lloyd steps over all vectors), every vector assigned to its `nprobe_assign`
    nearest centroids (≥2 so duplicates straddling a cluster boundary still share a cluster), then an
    exact cosine range search inside each cluster (faiss on CPU, blocked torch matmuls on GPU). A pair
    seen in several shared clusters is reported once (by the smallest shared cluster id), so no global
    de-duplication of the pair list is needed. Cost ≈ nprobe_assign² · n² · d / n_clusters.
  * "ivf": `IndexIVFFlat` (inner product), every vector queried with `nprobe` lists; k-NN results with
    k doubled for rows whose k-th neighbour is still above the threshold (GPU indexes cap k at 2048).
  * "exact": blocked brute force, O(n² d) — the reference for tests and small sets.
Memory stays bounded: queries/clusters are processed in blocks of at most `max_block_elems`
similarities; only the (small) list of pairs above the threshold grows.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

Method = Literal["clusters", "ivf", "exact"]


@dataclass
class SearchConfig:
    threshold: float = 0.9
    method: Method = "clusters"
    n_clusters: int | None = None  # None: 4·sqrt(n) (k-means / IVF lists), see auto_clusters
    nprobe_assign: int = 2  # clusters: centroids each vector is assigned to
    nprobe: int = 16  # ivf: lists probed per query
    k: int = 32  # ivf: initial neighbours per query (doubled while saturated)
    kmeans_iters: int = 10
    max_points_per_centroid: int = 64  # k-means trains on at most this many points per centroid (speed)
    refine_passes: int = 2  # Lloyd steps over *all* vectors after sample training (see _full_lloyd_step)
    block_rows: int = 16384  # rows per assignment / query block
    max_block_elems: int = 1 << 24  # similarities materialised at once (64 MiB of float32)
    seed: int = 0
    use_gpu: bool | None = None  # None: auto (faiss.get_num_gpus() > 0)
    backend: Literal["auto", "faiss", "torch"] = "auto"  # in-cluster search: faiss (CPU) / torch (GPU)


@dataclass
class Pairs:
    i: np.ndarray  # (p,) int64, i < j
    j: np.ndarray  # (p,) int64
    sim: np.ndarray  # (p,) float32, cosine similarity ≥ threshold
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.i)

    def keys(self, n: int) -> np.ndarray:
        return self.i * n + self.j


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("near-duplicate search needs faiss: pip install 'herd[data]'") from e
    return faiss


def _gpu(cfg: SearchConfig) -> bool:
    faiss = _faiss()
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return n_gpu > 0 if cfg.use_gpu is None else bool(cfg.use_gpu and n_gpu > 0)


def _torch_device(cfg: SearchConfig) -> torch.device | None:
    """Device for the in-cluster search: None → faiss on CPU; a torch device → blocked matmuls there."""
    if cfg.backend == "torch" or (cfg.backend == "auto" and _gpu(cfg)):
        return torch.device("cuda") if _gpu(cfg) and torch.cuda.is_available() else torch.device("cpu")
    return None


def auto_clusters(n: int) -> int:
    """4·√n clusters (4,000 for 1M): balances assignment cost (n·k·d per pass) against in-cluster
    search (a²·n²·d/k), and small clusters give each vector a larger pull on its own centroid in the
    full-data Lloyd steps (recall 97.6% at 2·√n vs 99.45% at 4·√n on the random-vector benchmark)."""
    return max(1, min(n // 8, int(round(4 * math.sqrt(n)))))


def _pairs_in_set(
    x: np.ndarray, members: np.ndarray, t: float, cfg: SearchConfig, dev: torch.device | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b, of `members` (sorted global row ids) with x[a]·x[b] ≥ t."""
    if dev is None:
        return _pairs_in_set_faiss(x, members, t, cfg)
    return _pairs_in_set_torch(x, members, t, cfg, dev)


def _pairs_in_set_faiss(
    x: np.ndarray, members: np.ndarray, t: float, cfg: SearchConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    li, lj, s = local_pairs_faiss(np.ascontiguousarray(x[members]), t, cfg)
    return members[li], members[lj], s


def local_pairs_faiss(
    xm: np.ndarray, t: float, cfg: SearchConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a, b), a < b, of row positions of `xm` (m, d) float32 with xm[a]·xm[b] ≥ t.

    CPU: faiss range search (blocked BLAS inside faiss). Keeping k-means, assignment and this search
    in faiss's own OpenMP runtime avoids two thread pools (faiss's and torch's) spinning against
    each other, which on a 2-core machine made the search several times slower. The result depends
    only on `xm` (same rows in the same order → same pairs), which the sharded search relies on."""
    faiss = _faiss()
    xm = np.ascontiguousarray(xm, dtype=np.float32)
    index = faiss.IndexFlatIP(xm.shape[1])
    index.add(xm)
    out_i, out_j, out_s = [], [], []
    q = max(1, cfg.max_block_elems // max(1, len(xm)))  # queries per block: bounded similarity matrix
    for q0 in range(0, len(xm), q):
        lims, sims, nb = index.range_search(xm[q0 : q0 + q], t)  # CSR: row r's hits at lims[r]:lims[r+1]
        rows = q0 + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        keep = nb > rows  # each unordered pair once, no self pairs
        out_i.append(rows[keep])
        out_j.append(nb[keep].astype(np.int64))
        out_s.append(sims[keep])
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def _pairs_in_set_torch(
    x: np.ndarray, members: np.ndarray, t: float, cfg: SearchConfig, dev: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    li, lj, s = local_pairs_torch(np.ascontiguousarray(x[members]), t, cfg, dev)
    return members[li], members[lj], s


def local_pairs_torch(
    xm: np.ndarray, t: float, cfg: SearchConfig, dev: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As `local_pairs_faiss` with blocked matmuls on `dev` (GPU: faiss has no GPU range search);
    only blocks on/above the diagonal are computed."""
    m = len(xm)
    out_i, out_j, out_s = [], [], []
    b = max(1, min(m, int(math.sqrt(cfg.max_block_elems))))
    xt = torch.from_numpy(np.ascontiguousarray(xm, dtype=np.float32)).to(dev)  # (m, d)
    for r0 in range(0, m, b):
        rows = xt[r0 : r0 + b]
        for c0 in range(r0, m, b):
            s = rows @ xt[c0 : c0 + b].T  # (br, bc)
            hit = s >= t
            if c0 == r0:
                hit &= torch.ones_like(hit).triu(1)  # strict upper triangle: a < b, no self pairs
            ri, ci = hit.nonzero(as_tuple=True)
            if len(ri):
                out_i.append(r0 + ri.cpu().numpy())
                out_j.append(c0 + ci.cpu().numpy())
                out_s.append(s[ri, ci].float().cpu().numpy())
    if not out_i:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def local_pairs(
    xm: np.ndarray, t: float, cfg: SearchConfig, dev: torch.device | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of row positions of `xm` above `t`: faiss on CPU (dev None) or torch matmuls on `dev`."""
    return local_pairs_faiss(xm, t, cfg) if dev is None else local_pairs_torch(xm, t, cfg, dev)


def exact_pairs(x: np.ndarray, threshold: float, cfg: SearchConfig | None = None) -> Pairs:
    """Brute-force reference: every pair i < j with cosine ≥ threshold."""
    cfg = cfg or SearchConfig(threshold=threshold, method="exact")
    t0 = time.perf_counter()
    i, j, s = _pairs_in_set(x, np.arange(len(x), dtype=np.int64), threshold, cfg, _torch_device(cfg))
    return Pairs(i, j, s, {"method": "exact", "search_s": time.perf_counter() - t0})


def exact_neighbors(x: np.ndarray, queries: np.ndarray, threshold: float) -> Pairs:
    """All pairs (q, j), j ≠ q, with x[q]·x[j] ≥ threshold for the query rows `queries` (brute force
    faiss range search over all of `x`), returned as (min, max). Used to sample the exact answer on
    a large set: its time extrapolates to exact all-pairs search."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    lims, sims, nb = index.range_search(np.ascontiguousarray(x[queries], dtype=np.float32), threshold)
    q = np.repeat(queries.astype(np.int64), np.diff(lims).astype(np.int64))
    ok = nb != q
    q, nb, sims = q[ok], nb[ok], sims[ok]
    return Pairs(np.minimum(q, nb), np.maximum(q, nb), sims.astype(np.float32))


def _train_kmeans(x: np.ndarray, k: int, cfg: SearchConfig, gpu: bool) -> np.ndarray:
    faiss = _faiss()
    rng = np.random.default_rng(cfg.seed)
    n_train = min(len(x), k * cfg.max_points_per_centroid)
    sample = np.sort(rng.choice(len(x), n_train, replace=False)) if n_train < len(x) else np.arange(len(x))
    km = faiss.Kmeans(
        x.shape[1], k, niter=cfg.kmeans_iters, spherical=True, seed=cfg.seed, gpu=gpu,
        min_points_per_centroid=1, max_points_per_centroid=cfg.max_points_per_centroid, verbose=False,
    )  # fmt: skip
    km.train(np.ascontiguousarray(x[sample], dtype=np.float32))
    c = km.centroids.astype(np.float32)  # (k, d), unit norm (spherical)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _centroids(x: np.ndarray, k: int, cfg: SearchConfig, gpu: bool) -> np.ndarray:
    """k-means on a sample, then `refine_passes` Lloyd steps over all of x → (k, d) unit centroids."""
    c = _train_kmeans(x, k, cfg, gpu)
    for _ in range(cfg.refine_passes):
        c = _full_lloyd_step(x, c, cfg, gpu)
    return c


def _full_lloyd_step(x: np.ndarray, centroids: np.ndarray, cfg: SearchConfig, gpu: bool) -> np.ndarray:
    """One k-means iteration over *all* vectors (k-means itself trains on a sample).

    Why: a centroid that includes a vector (and its near-duplicates) in its mean is pulled towards
    them, so duplicates land in the same cluster with a margin. Without this, vectors outside the
    training sample on unstructured data are assigned almost at random and duplicate pairs split
    across clusters (measured on the random-vector benchmark at n = 200k: pair recall 95.0% → 99.4%
    with one pass; at 1M, two passes are the default). Each pass costs one assignment pass (n·k·d).
    """
    from scipy.sparse import csr_matrix

    k, d = centroids.shape
    index = _flat_ip(centroids, gpu)
    sums = np.zeros((k, d), np.float64)
    for r0 in range(0, len(x), cfg.block_rows):
        xb = np.ascontiguousarray(x[r0 : r0 + cfg.block_rows])
        _, top = index.search(xb, 1)
        onehot = csr_matrix(
            (np.ones(len(xb), np.float32), (top[:, 0], np.arange(len(xb)))), shape=(k, len(xb))
        )
        sums += onehot @ xb  # (k, d): per-centroid sum of the block's members
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    fresh = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
    return np.where(norms > 0, fresh, centroids)  # an empty cluster keeps its trained centroid


def _flat_ip(c: np.ndarray, gpu: bool):
    faiss = _faiss()
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    return faiss.index_cpu_to_all_gpus(index) if gpu else index


def _cluster_pairs(x: np.ndarray, cfg: SearchConfig) -> Pairs:
    n = len(x)
    gpu = _gpu(cfg)
    dev = _torch_device(cfg)
    k = min(cfg.n_clusters or auto_clusters(n), n)
    a = max(1, min(cfg.nprobe_assign, k))
    t0 = time.perf_counter()
    centroids = _centroids(x, k, cfg, gpu)
    t1 = time.perf_counter()
    index = _flat_ip(centroids, gpu)
    assign = np.empty((n, a), np.int64)  # (n, a): the a nearest centroids of each vector
    for r0 in range(0, n, cfg.block_rows):
        _, assign[r0 : r0 + cfg.block_rows] = index.search(
            np.ascontiguousarray(x[r0 : r0 + cfg.block_rows]), a
        )
    t2 = time.perf_counter()
    # Inverted lists: a stable sort keeps members of each cluster in ascending row order.
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    rows = (order // a).astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=k))])
    out_i, out_j, out_s = [], [], []
    sims_computed = 0
    for c in range(k):
        members = rows[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        sims_computed += len(members) * (len(members) - 1) // 2
        i, j, s = _pairs_in_set(x, members, cfg.threshold, cfg, dev)
        if len(i):
            # Report a pair only in the smallest cluster both ends share (it can share up to a of them).
            keep = first_shared_cluster(assign[i], assign[j], k) == c
            out_i.append(i[keep])
            out_j.append(j[keep])
            out_s.append(s[keep])
    t3 = time.perf_counter()
    sizes = np.diff(bounds)
    stats = {
        "method": "clusters", "n_clusters": k, "nprobe_assign": a, "gpu": gpu,
        "kmeans_s": t1 - t0, "assign_s": t2 - t1, "search_s": t3 - t2,
        "max_cluster": int(sizes.max()), "mean_cluster": float(sizes.mean()),
        "similarities_computed": int(sims_computed),
    }  # fmt: skip
    return _collect(out_i, out_j, out_s, stats)


def first_shared_cluster(ai: np.ndarray, aj: np.ndarray, k: int) -> np.ndarray:
    """(p,) smallest cluster id shared by the assignments ai, aj (p, a) of a pair's two ends (k if none):
    the one cluster that reports the pair, so no global de-duplication of the pair list is needed."""
    shared = ai[:, :, None] == aj[:, None, :]  # (p, a, a)
    return np.where(shared.any(axis=2), ai, k).min(axis=1)


def _collect(out_i: list, out_j: list, out_s: list, stats: dict[str, Any]) -> Pairs:
    if not out_i:
        e = np.zeros(0, np.int64)
        return Pairs(e, e.copy(), np.zeros(0, np.float32), stats)
    return Pairs(
        np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32), stats
    )


def _ivf_pairs(x: np.ndarray, cfg: SearchConfig) -> Pairs:
    faiss = _faiss()
    n, d = x.shape
    gpu = _gpu(cfg)
    nlist = min(cfg.n_clusters or auto_clusters(n), n)
    t0 = time.perf_counter()
    centroids = _centroids(x, nlist, cfg, gpu)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)  # the k-means centroids are the coarse quantizer: no second training
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    for r0 in range(0, n, cfg.block_rows):
        index.add(np.ascontiguousarray(x[r0 : r0 + cfg.block_rows]))
    nprobe = min(cfg.nprobe, nlist, 2048)  # faiss-gpu caps nprobe at 2048
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    # ParameterSpace reaches nprobe through GPU replicas/shards too, where the attribute is not exposed.
    (faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()).set_index_parameter(
        index, "nprobe", nprobe
    )
    t1 = time.perf_counter()
    max_k = min(2048, n)
    keys: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    saturated_rows = 0
    for r0 in range(0, n, cfg.block_rows):
        rows = np.arange(r0, min(n, r0 + cfg.block_rows))
        k = min(cfg.k, n)
        while len(rows):
            dist, nb = index.search(np.ascontiguousarray(x[rows]), k)  # (b, k) similarities, ids
            ok = (nb >= 0) & (dist >= cfg.threshold) & (nb != rows[:, None])
            q = np.broadcast_to(rows[:, None], nb.shape)[ok]
            keys.append(np.minimum(q, nb[ok]) * n + np.maximum(q, nb[ok]))
            sims.append(dist[ok])
            full = dist[:, -1] >= cfg.threshold  # k-th neighbour still a duplicate: maybe more beyond k
            if k >= max_k:
                saturated_rows += int(full.sum())
                break
            rows, k = rows[full], min(2 * k, max_k)
    if saturated_rows:
        warnings.warn(
            f"{saturated_rows} vectors have ≥{max_k} duplicates; groups rely on transitivity", stacklevel=2
        )
    t2 = time.perf_counter()
    if not keys:
        return _collect([], [], [], {})
    allk = np.concatenate(keys)
    alls = np.concatenate(sims)
    uk, first = np.unique(allk, return_index=True)  # a pair is usually found from both ends
    stats = {
        "method": "ivf", "n_clusters": nlist, "nprobe": nprobe, "gpu": gpu,
        "kmeans_s": t1 - t0, "search_s": t2 - t1, "saturated_rows": saturated_rows,
    }  # fmt: skip
    return Pairs(uk // n, uk % n, alls[first].astype(np.float32), stats)


def find_pairs(x: np.ndarray, cfg: SearchConfig) -> Pairs:
    """Pairs i < j of rows of `x` (n, d) float32, unit-norm, with cosine ≥ cfg.threshold."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected (n, d) descriptors, got shape {x.shape}")
    t0 = time.perf_counter()
    if len(x) < 2:
        p = _collect([], [], [], {"method": cfg.method})
    elif cfg.method == "exact":
        p = exact_pairs(x, cfg.threshold, cfg)
    elif cfg.method == "clusters":
        p = _cluster_pairs(x, cfg)
    elif cfg.method == "ivf":
        p = _ivf_pairs(x, cfg)
    else:
        raise ValueError(f"unknown method {cfg.method!r} (clusters|ivf|exact)")
    p.stats["total_s"] = time.perf_counter() - t0
    p.stats["pairs"] = len(p)
    return p


def connected_groups(n: int, pairs: Pairs) -> np.ndarray:
    """Component label of every row (n,) int64: rows joined by a chain of pairs share a label."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(pairs), np.int8), (pairs.i, pairs.j)), shape=(n, n)).tocsr()
    _, labels = connected_components(g, directed=False)
    return labels.astype(np.int64)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label arrays describe the same grouping (label values may differ)."""
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))
