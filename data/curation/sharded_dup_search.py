"""Near-duplicate image search spread over ranks: no process ever holds the whole descriptor set.

The same algorithm as `near_dup_search`'s "clusters" method, cut into stages that run on every rank
(torch.distributed: gloo on CPU, NCCL on GPUs; at world size 1 no process group is needed):

  shards   descriptors as float16 memory-mapped shards `shards/desc_XXXXX.npy` (unit rows); shard s
           is converted by rank s % world (see `shards_from_npy` / `shards_from_embeddings`)
  kmeans   distributed spherical k-means on a seeded sample of rows: row i is in the sample when
           u(seed, i) < k · max_points_per_centroid / n, where u is a per-row hash of the global row
           (splitmix64, uniform on [0, 1)), so the row set does not depend on the world size and
           every rank decides membership for its own shards' rows only, a block at a time. Initial
           centroids are the k rows of smallest u (k distinct uniformly random rows, as faiss starts
           from random training points), found by an all-reduce of each rank's k smallest and
           assembled by an all-reduce of a (k, d) matrix in which each rank fills the rows it owns;
           then `kmeans_iters` Lloyd iterations over the sample and `refine_passes` over all vectors:
           top-1 assignment, per-centroid float64 sums all-reduced, renormalised (an empty cluster
           keeps its centroid). Unlike faiss.Kmeans no rank holds the sample, so the centroids differ
           from `near_dup_search`'s (recall is compared against brute force in the tests)
  assign   every rank assigns its shards' rows to their `nprobe_assign` nearest centroids and routes
           each (row, cluster) entry with its float16 vector to the rank owning the cluster
           (cluster c on rank c % world) through per-(shard, rank) files on the shared filesystem
  search   every rank sorts what it received by (cluster, row) into one file and range-searches each
           of its clusters exactly; a pair is reported only by the smallest cluster its two ends
           share, so the per-rank pair lists are disjoint
  groups   rank 0 gathers the (small) pair lists and runs connected components once

Why the result does not depend on the world size: every per-row computation (assignment, Lloyd
top-1 on the sample and on all rows) runs in blocks aligned to the shard, not to the rank, so a row
meets the same BLAS calls whichever rank owns it; the Lloyd sums are exact (float16 values are
multiples of 2⁻²⁴, so float64 sums of fewer than 2²⁹ of them are exact in any order), and so is the
all-reduce that assembles the initial centroids (one nonzero term per entry); a cluster is searched
with its members in ascending row order on any rank. Hence world 1 of this code is the
single-process reference and 2, 4, … ranks return exactly its pairs (tested).

Memory per rank: one block of rows (float32, plus a float64 copy of at most `SUM_ROWS` rows for the
exact sums), the (k, d) centroids (float32, and faiss's copy in its index) and sums (float64): these
grow as k = 4·√n, not n/world (k·d·16 bytes: 33 MB at 1M, 328 MB at 100M), and the shard currently
read: a shard is memory-mapped only while it is read (mapped pages count in a process' resident
memory), routed vectors are written and read a block or a cluster at a time. What grows with n/world: the sorted (row, cluster) metadata
of the received entries in the search stage ((2 + a) int64 per entry, plus an int64 position while
the sorted file is filled). The sample's membership is computed per shard (a hash per row), so no
rank allocates anything n-long (numpy's `choice`, used before, allocated an n-long permutation on
every rank whenever the sample exceeded n/50 rows: 800 MB per rank at 100M).

Resumption: every stage ends with `STAGE.done` (written by rank 0 after a barrier); inside a stage,
per-step / per-shard / per-rank outputs are written atomically and skipped when present (k-means: one
centroid file per iteration), so a restart after a kill of any rank redoes only unfinished work.
`plan.json` pins n, d, shards, world size and the settings that determine the centroids.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.curation.near_dup_search import (
    Pairs,
    SearchConfig,
    _faiss,
    _gpu,
    auto_clusters,
    connected_groups,
    first_shared_cluster,
    local_pairs,
)
from herd.data.records import atomic_save_npy, atomic_write, atomic_write_json

STAGES = ("kmeans", "assign", "search", "groups")
SUM_ROWS = 2048  # rows per float64 copy in the exact Lloyd sums (2048 × d × 8 bytes: 8 MiB at d = 512)


class Comm:
    """The few collectives the stages need; a no-op at world size 1 (no process group)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.device = torch.device("cpu")
        self._dist: Any = None
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():  # env:// rendezvous (torchrun sets MASTER_ADDR/PORT)
                if torch.cuda.is_available():
                    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if dist.get_backend() == "nccl":
                self.device = torch.device("cuda", torch.cuda.current_device())
            self._dist = dist

    def barrier(self) -> None:
        if self._dist is not None:
            self._dist.barrier()

    def all_reduce_sum(self, arr: np.ndarray) -> np.ndarray:
        if self._dist is None:
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        self._dist.all_reduce(t)
        return t.cpu().numpy()


def row_uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """(count,) float64 in [0, 1): a hash (splitmix64) of each global row start … start + count - 1
    under `seed`. A counter-based draw: any rank computes any row's value alone, with nothing n-long."""
    z = np.arange(start, start + count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z += np.uint64((0xD1B54A32D192ED03 * (seed + 1)) % (1 << 64))  # seeds the stream; wraps mod 2^64
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53  # the top 53 bits: exact in float64


def shard_path(work: Path, s: int) -> Path:
    return work / "shards" / f"desc_{s:05d}.npy"


def _to_f16_unit(b: np.ndarray) -> np.ndarray:
    b = np.asarray(b, dtype=np.float32)
    return (b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)).astype(np.float16)


def shards_from_npy(npy: str | Path, work: str | Path, shard_rows: int, rank: int, world: int) -> int:
    """Cut a (n, d) .npy (rows in input order, read memory-mapped) into float16 unit-row shards;
    this rank converts shards s with s % world == rank. Returns the shard count."""
    raw = np.load(npy, mmap_mode="r")
    if raw.ndim != 2:
        raise ValueError(f"{npy}: expected (n, d) descriptors, got shape {raw.shape}")
    n_shards = max(1, -(-len(raw) // shard_rows))
    del raw
    for s in range(rank, n_shards, world):
        if not shard_path(Path(work), s).is_file():
            # Mapped afresh per shard: one mapping kept for the loop would keep every page this rank
            # read resident (n·d·4/world bytes of float32), not just the current shard's.
            raw = np.load(npy, mmap_mode="r")
            atomic_save_npy(
                shard_path(Path(work), s), _to_f16_unit(raw[s * shard_rows : (s + 1) * shard_rows])
            )
            del raw
    return n_shards


def shards_from_embeddings(
    emb_dir: str | Path, n_shards: int, work: str | Path, rank: int, world: int
) -> int:
    """float16 shards from `embed.embed_source`'s `emb_XXXXX.npy` work shards (same indices)."""
    for s in range(rank, n_shards, world):
        if not shard_path(Path(work), s).is_file():
            atomic_save_npy(
                shard_path(Path(work), s), _to_f16_unit(np.load(Path(emb_dir) / f"emb_{s:05d}.npy"))
            )
    return n_shards


def save_rows_npy(path: Path, x: np.ndarray, rows: np.ndarray, block_rows: int) -> None:
    """x[rows] as an .npy, written atomically `block_rows` rows at a time: the (len(rows), d)
    selection is never materialised whole."""
    header = {"descr": np.lib.format.dtype_to_descr(x.dtype), "fortran_order": False,
              "shape": (len(rows), *x.shape[1:])}  # fmt: skip
    with atomic_write(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for b0 in range(0, len(rows), block_rows):
            f.write(np.ascontiguousarray(x[rows[b0 : b0 + block_rows]]).data)


def rank_peak_rss_mb() -> float:
    """This process' peak resident memory (MiB). Linux: VmHWM, because ru_maxrss survives exec and
    would report the launching parent's peak for a freshly spawned rank."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Restart this process' VmHWM from its current resident memory (Linux `clear_refs` 5), so that
    a stage's peak can be read on its own; False where the kernel does not offer it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ShardedSearch:
    """Runs the stages for one rank over the float16 shards in `work/shards`."""

    def __init__(self, work: str | Path, n_shards: int, cfg: SearchConfig, comm: Comm):
        self.work, self.cfg, self.comm = Path(work), cfg, comm
        self.rank, self.world = comm.rank, comm.world
        self.n_shards = n_shards
        shapes = [self._shard(s).shape for s in range(n_shards)]  # headers only: no mapping is kept
        self.sizes = np.array([sh[0] for sh in shapes], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.offsets[-1])
        self.d = int(shapes[0][1]) if n_shards else 0
        self.k = max(1, min(cfg.n_clusters or auto_clusters(self.n), self.n))
        self.a = max(1, min(cfg.nprobe_assign, self.k))
        self.gpu = _gpu(cfg)
        self.mine = list(range(self.rank, n_shards, self.world))  # shards this rank reads
        self.stats: dict[str, Any] = {"rank": self.rank, "world": self.world, "stages": {}}
        self._check_plan()

    def _check_plan(self) -> None:
        plan = {"n": self.n, "d": self.d, "n_shards": self.n_shards, "world": self.world, "k": self.k,
                "a": self.a, "threshold": self.cfg.threshold, "seed": self.cfg.seed,
                "refine_passes": self.cfg.refine_passes, "kmeans_iters": self.cfg.kmeans_iters,
                "max_points_per_centroid": self.cfg.max_points_per_centroid,
                "block_rows": self.cfg.block_rows, "kmeans": "sharded-lloyd-hash-sample"}  # fmt: skip
        path = self.work / "plan.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != plan:
                raise ValueError(
                    f"{path}: this work folder was started with {old}, now {plan}; use a new one"
                )
        self.comm.barrier()  # every rank has read the old plan before rank 0 writes a new one
        if self.rank == 0 and not path.is_file():
            atomic_write_json(path, plan)

    # ------------------------------------------------------------------------------------ helpers
    def _stage(self, name: str, body: Callable[[], None]) -> None:
        marker = self.work / f"{name}.done"
        t0 = time.perf_counter()
        if marker.is_file():  # every rank sees the same answer: markers appear only between barriers
            self.stats["stages"][name] = "skipped"
            return
        per_stage = reset_peak_rss()
        body()
        if per_stage:  # this rank's peak inside the stage (the whole run's is `peak_rss_mb`)
            self.stats[f"{name}_peak_rss_mb"] = round(rank_peak_rss_mb(), 1)
        self.comm.barrier()
        if self.rank == 0:
            atomic_write_json(marker, {"world": self.world})
        self.comm.barrier()
        self.stats["stages"][name] = "ran"
        self.stats[f"{name}_s"] = round(time.perf_counter() - t0, 3)

    def _index(self, centroids: np.ndarray):
        faiss = _faiss()
        index = faiss.IndexFlatIP(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        if self.gpu:  # one GPU per rank (LOCAL_RANK), not all GPUs per rank
            dev = int(os.environ.get("LOCAL_RANK", 0)) % faiss.get_num_gpus()
            self._gpu_res = getattr(self, "_gpu_res", None) or faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, dev, index)
        return index

    def _shard(self, s: int) -> np.ndarray:
        """Shard s memory-mapped, (m, d) float16. Callers drop it when done with the shard: its pages
        leave this process' resident memory with the mapping (a kept mapping would hold them all)."""
        return np.load(shard_path(self.work, s), mmap_mode="r")

    def _blocks(self, s: int):
        """float32 blocks of shard s, aligned to the shard (identical on any world size)."""
        x = self._shard(s)
        for r0 in range(0, len(x), self.cfg.block_rows):
            yield r0, np.ascontiguousarray(x[r0 : r0 + self.cfg.block_rows], dtype=np.float32)

    def _sample_blocks(self, s: int, local: np.ndarray):
        """float32 blocks of the sample rows `local` (shard-local, ascending) of shard s, block_rows
        sample rows each: the same blocks whichever rank owns the shard."""
        x = self._shard(s)
        for b0 in range(0, len(local), self.cfg.block_rows):
            yield np.ascontiguousarray(x[local[b0 : b0 + self.cfg.block_rows]], dtype=np.float32)

    def _centroids(self, p: int) -> Path:
        return self.work / "kmeans" / f"centroids_{p}.npy"

    # ------------------------------------------------------------------------------------- kmeans
    def _kmeans_files(self) -> list[Path]:
        """The stage's centroid files, one per step: sample_0 the initial rows, sample_t after t Lloyd
        iterations on the sample, centroids_0 after the last of them, centroids_p after p passes
        over all vectors (the last one is what `assign` uses)."""
        sample = [self.work / "kmeans" / f"sample_{t}.npy" for t in range(self.cfg.kmeans_iters)]
        return sample + [self._centroids(p) for p in range(self.cfg.refine_passes + 1)]

    def _my_sample(self) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """This rank's part of the training sample: {shard: (m_s,) shard-local rows, ascending} for its
        own shards, and the (k,) global rows of the initial centroids (centroid j = row init[j]).
        Memory: block_rows hashes at a time, this rank's sample rows and (world, k) candidates."""
        n_train = min(self.n, self.k * self.cfg.max_points_per_centroid)
        rate = n_train / self.n  # the expected sample is n_train rows (binomial around it)
        mine: dict[int, np.ndarray] = {}
        best_u, best_row = np.full(self.k, 2.0), np.full(self.k, -1, np.int64)  # this rank's k smallest u
        step = self.cfg.block_rows
        for s in self.mine:
            kept = []
            for b0 in range(0, int(self.sizes[s]), step):  # block_rows hashes at a time
                u = row_uniforms(self.cfg.seed, int(self.offsets[s]) + b0, min(step, int(self.sizes[s]) - b0))
                kept.append(b0 + (np.arange(len(u)) if rate >= 1 else np.nonzero(u < rate)[0]))
                cand = np.argpartition(u, self.k - 1)[: self.k] if len(u) > self.k else np.arange(len(u))
                cand_u = np.concatenate([best_u, u[cand]])
                cand_row = np.concatenate([best_row, cand + b0 + self.offsets[s]])
                top = np.lexsort((cand_row, cand_u))[: self.k]  # ties in u broken by row: exact anywhere
                best_u, best_row = cand_u[top], cand_row[top]
            mine[s] = np.concatenate(kept) if kept else np.zeros(0, np.int64)
        # Gather every rank's k smallest by an exact all-reduce (one nonzero term per entry).
        all_u = np.zeros((self.world, self.k))
        all_row = np.zeros((self.world, self.k), np.int64)
        all_u[self.rank], all_row[self.rank] = best_u, best_row
        all_u, all_row = self.comm.all_reduce_sum(all_u).ravel(), self.comm.all_reduce_sum(all_row).ravel()
        top = np.lexsort((all_row, all_u))[: self.k]  # k ≤ n, so these are k real rows (u < 2)
        return mine, all_row[top]

    def _init_centroids(self, init: np.ndarray) -> np.ndarray:
        """(k, d) unit rows: each rank fills the initial rows of its shards into zeros; the all-reduce
        is exact (one nonzero term per entry), so every rank gets the same matrix without any
        rank reading another's rows."""
        c = np.zeros((self.k, self.d), np.float64)
        shard_of = np.searchsorted(self.offsets, init, side="right") - 1
        for s in self.mine:
            j = np.nonzero(shard_of == s)[0]
            if len(j):
                c[j] = self._shard(s)[init[j] - self.offsets[s]]
        c = self.comm.all_reduce_sum(c)
        return (c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _add_top1(self, sums: np.ndarray, index, xb: np.ndarray) -> None:
        """sums (k, d) float64 += per-centroid sums of the rows of xb (b, d) under top-1 assignment.
        Exact (see top), so the order of blocks, sub-blocks and ranks does not matter."""
        _, top = index.search(xb, 1)  # one call per shard-aligned block: same result on any world
        for r0 in range(0, len(xb), SUM_ROWS):  # bounds the float64 copies below
            t = top[r0 : r0 + SUM_ROWS, 0]
            order = np.argsort(t, kind="stable")
            used, starts = np.unique(t[order], return_index=True)
            # (u, d) sums of the u ≤ SUM_ROWS centroids this sub-block uses: no (k, d) temporary,
            # which at k = 40,000 (n = 100M) would be 164 MB per call
            sums[used] += np.add.reduceat(xb[r0 : r0 + SUM_ROWS][order].astype(np.float64), starts, axis=0)

    def _lloyd_step(self, c: np.ndarray, sample: dict[int, np.ndarray] | None) -> np.ndarray:
        """One spherical Lloyd step over this rank's sample rows (`sample`) or all its rows (None);
        the sums are all-reduced, so every rank returns the same (k, d) float32 centroids."""
        index = self._index(c)
        sums = np.zeros((self.k, self.d), np.float64)
        for s in self.mine:
            if sample is None:
                blocks = (xb for _, xb in self._blocks(s))
            else:
                blocks = self._sample_blocks(s, sample[s])
            for xb in blocks:
                self._add_top1(sums, index, xb)
        sums = self.comm.all_reduce_sum(sums)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        fresh = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
        return np.where(norms > 0, fresh, c)  # an empty cluster keeps its centroid

    def _kmeans(self) -> None:
        iters = self.cfg.kmeans_iters
        c = np.zeros((self.k, self.d), np.float32)
        sample: tuple[dict[int, np.ndarray], np.ndarray] | None = None
        for q, path in enumerate(self._kmeans_files()):
            self.comm.barrier()
            # Rank 0 writes step q's file only after its all-reduce, which every rank enters after
            # this check: all ranks agree whether to skip the step.
            if path.is_file():
                c = np.load(path)
                continue
            if q <= iters and sample is None:
                sample = self._my_sample()
            if q == 0:
                c = self._init_centroids(sample[1])
            else:
                c = self._lloyd_step(c, sample[0] if q <= iters else None)
            if self.rank == 0:
                atomic_save_npy(path, c)
        self.comm.barrier()

    # ------------------------------------------------------------------------------------- assign
    def _route(self, s: int, r: int) -> tuple[Path, Path]:
        base = self.work / "route" / f"s{s:05d}_to_r{r:04d}"
        return base.with_suffix(".meta.npy"), base.with_suffix(".vec.npy")

    def _assign(self) -> None:
        index = self._index(np.load(self._centroids(self.cfg.refine_passes)))
        for s in self.mine:
            done = self.work / "route" / f"s{s:05d}.done"
            if done.is_file():
                continue
            assign = np.empty((int(self.sizes[s]), self.a), np.int64)  # (m, a) nearest centroids
            for r0, xb in self._blocks(s):
                _, assign[r0 : r0 + len(xb)] = index.search(xb, self.a)
            clusters = assign.ravel()  # (m·a,) one entry per (row, cluster), row-major
            x = self._shard(s)
            for r in range(self.world):
                e = np.nonzero(clusters % self.world == r)[0]  # (e,) entries rank r owns
                rows = e // self.a
                meta = np.column_stack([rows + self.offsets[s], clusters[e], assign[rows]])
                meta_p, vec_p = self._route(s, r)
                save_rows_npy(vec_p, x, rows, self.cfg.block_rows)  # (e, d) float16, block by block
                atomic_save_npy(meta_p, meta)  # (e, 2 + a): global row, cluster, its a clusters
            del x  # unmaps the shard: its pages leave this rank's resident memory
            done.touch()

    # ------------------------------------------------------------------------------------- search
    def _search(self) -> None:
        out = self.work / "pairs" / f"rank_{self.rank:04d}.npz"
        if out.is_file():
            self.stats["search_resumed"] = True
            return
        metas = [np.load(self._route(s, self.rank)[0]) for s in range(self.n_shards)]
        lens = [len(m) for m in metas]
        meta = np.concatenate(metas) if metas else np.zeros((0, 2 + self.a), np.int64)
        del metas
        order = np.lexsort((meta[:, 0], meta[:, 1]))  # by cluster, rows ascending inside it
        meta = meta[order]  # (E, 2 + a)
        where = np.empty(len(order), np.int64)
        where[order] = np.arange(len(order))  # position in the sorted file of each received entry
        del order
        vec_path = self._sorted_vectors(lens, where, len(meta))
        del where
        clusters, bounds = np.unique(meta[:, 1], return_index=True)
        bounds = np.append(bounds, len(meta))
        dev = self._torch_device()
        out_i, out_j, out_s = [], [], []
        computed, t0 = 0, time.perf_counter()
        row_bytes = self.d * 2
        with open(vec_path, "rb") as vf:  # plain reads, one cluster at a time: nothing stays mapped
            for c, b0, b1 in zip(clusters, bounds[:-1], bounds[1:]):
                if b1 - b0 < 2:
                    continue
                computed += (b1 - b0) * (b1 - b0 - 1) // 2
                vf.seek(int(b0) * row_bytes)
                xc = np.frombuffer(vf.read(int(b1 - b0) * row_bytes), np.float16).reshape(-1, self.d)
                li, lj, sim = local_pairs(xc.astype(np.float32), self.cfg.threshold, self.cfg, dev)
                if len(li):
                    m = meta[b0:b1]
                    keep = first_shared_cluster(m[li, 2:], m[lj, 2:], self.k) == c
                    out_i.append(m[li[keep], 0])
                    out_j.append(m[lj[keep], 0])
                    out_s.append(sim[keep])
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        with atomic_write(out, "wb") as f:
            np.savez(f, i=cat(out_i, np.int64), j=cat(out_j, np.int64), sim=cat(out_s, np.float32),
                     computed=computed, clusters=len(clusters), entries=len(meta),
                     max_cluster=int(np.diff(bounds).max(initial=0)))  # fmt: skip
        vec_path.unlink()
        self.stats["search_only_s"] = round(time.perf_counter() - t0, 3)

    def _sorted_vectors(self, lens: list[int], where: np.ndarray, n_entries: int) -> Path:
        """The received vectors in (cluster, row) order as one raw float16 file (E, d), so that a
        cluster is a byte range; `where` (E,) is each received entry's position in it, route files
        in shard order. Filled one route file at a time through a mapping dropped after each: a
        mapping kept open would keep the whole file (E·d·2 bytes) resident. No msync: the written
        pages stay in the page cache, where the reads of `_search` find them (a flush per route
        file would force a disk write each time)."""
        vec_path = self.work / "search" / f"rank_{self.rank:04d}.f16"
        vec_path.parent.mkdir(parents=True, exist_ok=True)
        with open(vec_path, "wb") as f:
            f.truncate(n_entries * self.d * 2)
        start = 0
        for s, m in enumerate(lens):
            if m:
                vecs = np.memmap(vec_path, np.float16, "r+", shape=(n_entries, self.d))
                vecs[where[start : start + m]] = np.load(self._route(s, self.rank)[1])  # (m, d)
                del vecs
            start += m
        return vec_path

    def _torch_device(self) -> torch.device | None:
        if self.cfg.backend == "torch" or (self.cfg.backend == "auto" and self.gpu):
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
            return torch.device("cpu")
        return None

    # ------------------------------------------------------------------------------------- groups
    def _groups(self) -> None:
        if self.rank != 0:
            return
        files = [np.load(self.work / "pairs" / f"rank_{r:04d}.npz") for r in range(self.world)]
        i = np.concatenate([f["i"] for f in files])
        j = np.concatenate([f["j"] for f in files])
        sim = np.concatenate([f["sim"] for f in files])
        order = np.lexsort((j, i))  # a canonical order: the pair list is the same for any world size
        stats = {
            "method": "clusters-sharded", "n_clusters": self.k, "nprobe_assign": self.a, "gpu": self.gpu,
            "world": self.world, "similarities_computed": int(sum(int(f["computed"]) for f in files)),
            "max_cluster": int(max(int(f["max_cluster"]) for f in files)),
            "entries_per_rank": [int(f["entries"]) for f in files],
        }  # fmt: skip
        pairs = Pairs(i[order], j[order], sim[order], stats)
        with atomic_write(self.work / "pairs_all.npz", "wb") as f:
            np.savez(f, i=pairs.i, j=pairs.j, sim=pairs.sim, stats=json.dumps(stats))
        atomic_save_npy(self.work / "labels.npy", connected_groups(self.n, pairs))

    def run(self) -> Pairs | None:
        """All stages; rank 0 returns the global pair list (its labels are in work/labels.npy)."""
        t0 = time.perf_counter()
        before = rank_peak_rss_mb()  # the peaks so far (per-stage resets would otherwise lose them)
        self._stage("kmeans", self._kmeans)
        self._stage("assign", self._assign)
        self._stage("search", self._search)
        self._stage("groups", self._groups)
        self.stats["total_s"] = round(time.perf_counter() - t0, 3)
        stage_peaks = [v for key, v in self.stats.items() if key.endswith("_peak_rss_mb")]
        self.stats["peak_rss_mb"] = round(max([before, rank_peak_rss_mb(), *stage_peaks]), 1)
        atomic_write_json(self.work / "rank_stats" / f"rank_{self.rank:04d}.json", self.stats)
        if self.rank != 0:
            return None
        z = np.load(self.work / "pairs_all.npz")
        return Pairs(z["i"], z["j"], z["sim"], {**json.loads(str(z["stats"])), "ranks": self.rank_stats()})

    def rank_stats(self) -> list[dict[str, Any]]:
        files = sorted((self.work / "rank_stats").glob("rank_*.json"))
        return [json.loads(p.read_text()) for p in files]


def sharded_pairs(work: str | Path, n_shards: int, cfg: SearchConfig, rank: int, world: int) -> Pairs | None:
    """Every stage on this rank (call on all ranks, after the shards exist); rank 0 gets the pairs."""
    comm = Comm(rank, world)
    comm.barrier()  # every rank's shards are written before anyone opens them
    return ShardedSearch(work, n_shards, cfg, comm).run()
