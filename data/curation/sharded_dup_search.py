"""Near-duplicate image search spread over ranks: no process ever holds the whole descriptor set.

The same algorithm as `near_dup_search`'s "clusters" method, cut into stages that run on every rank
(torch.distributed: gloo on CPU, NCCL on GPUs; at world size 1 no process group is needed):

  shards   descriptors as float16 memory-mapped shards `shards/desc_XXXXX.npy` (unit rows); shard s
           is converted by rank s % world (see `shards_from_npy` / `shards_from_embeddings`)
  kmeans   rank 0 trains spherical k-means (faiss) on a seeded sample of rows read from the shards and
           broadcasts the centroids; `refine_passes` Lloyd steps over all vectors: every rank sums its
           own shards per centroid (float64), the sums are all-reduced
  assign   every rank assigns its shards' rows to their `nprobe_assign` nearest centroids and routes
           each (row, cluster) entry with its float16 vector to the rank owning the cluster
           (cluster c on rank c % world) through per-(shard, rank) files on the shared filesystem
  search   every rank sorts what it received by (cluster, row) into one memory-mapped file and range-
           searches each of its clusters exactly; a pair is reported only by the smallest cluster its
           two ends share, so the per-rank pair lists are disjoint
  groups   rank 0 gathers the (small) pair lists and runs connected components once

Why the result does not depend on the world size: every per-row computation (assignment, Lloyd
top-1) runs in blocks aligned to the shard, not to the rank, so a row meets the same BLAS calls
whichever rank owns it; the Lloyd sums are exact (float16 values are multiples of 2⁻²⁴, so float64
sums of fewer than 2²⁹ of them are exact in any order); a cluster is searched with its members in
ascending row order on any rank. Hence world 1 of this code is the single-process reference and
2, 4, … ranks return exactly its pairs (tested).

Resumption: every stage ends with `STAGE.done` (written by rank 0 after a barrier); inside a stage,
per-shard / per-rank outputs are written atomically and skipped when present, so a restart after a
kill of any rank redoes only unfinished work. `plan.json` pins n, d, shards and world size.
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

    def broadcast(self, arr: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if self._dist is None:
            assert arr is not None
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)) if self.rank == 0 else torch.empty(shape, dtype=dtype)
        t = t.to(self.device)
        self._dist.broadcast(t, src=0)
        return t.cpu().numpy()

    def all_reduce_sum(self, arr: np.ndarray) -> np.ndarray:
        if self._dist is None:
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        self._dist.all_reduce(t)
        return t.cpu().numpy()


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
    for s in range(rank, n_shards, world):
        if not shard_path(Path(work), s).is_file():
            atomic_save_npy(
                shard_path(Path(work), s), _to_f16_unit(raw[s * shard_rows : (s + 1) * shard_rows])
            )
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


class ShardedSearch:
    """Runs the stages for one rank over the float16 shards in `work/shards`."""

    def __init__(self, work: str | Path, n_shards: int, cfg: SearchConfig, comm: Comm):
        self.work, self.cfg, self.comm = Path(work), cfg, comm
        self.rank, self.world = comm.rank, comm.world
        self.n_shards = n_shards
        self.shards = [np.load(shard_path(self.work, s), mmap_mode="r") for s in range(n_shards)]
        self.sizes = np.array([len(x) for x in self.shards], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.offsets[-1])
        self.d = int(self.shards[0].shape[1]) if n_shards else 0
        self.k = max(1, min(cfg.n_clusters or auto_clusters(self.n), self.n))
        self.a = max(1, min(cfg.nprobe_assign, self.k))
        self.gpu = _gpu(cfg)
        self.mine = list(range(self.rank, n_shards, self.world))  # shards this rank reads
        self.stats: dict[str, Any] = {"rank": self.rank, "world": self.world, "stages": {}}
        self._check_plan()

    def _check_plan(self) -> None:
        plan = {"n": self.n, "d": self.d, "n_shards": self.n_shards, "world": self.world, "k": self.k,
                "a": self.a, "threshold": self.cfg.threshold, "seed": self.cfg.seed,
                "refine_passes": self.cfg.refine_passes}  # fmt: skip
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
        body()
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

    def _blocks(self, s: int):
        """float32 blocks of shard s, aligned to the shard (identical on any world size)."""
        x = self.shards[s]
        for r0 in range(0, len(x), self.cfg.block_rows):
            yield r0, np.ascontiguousarray(x[r0 : r0 + self.cfg.block_rows], dtype=np.float32)

    def _centroids(self, p: int) -> Path:
        return self.work / "kmeans" / f"centroids_{p}.npy"

    # ------------------------------------------------------------------------------------- kmeans
    def _train(self) -> np.ndarray:
        faiss = _faiss()
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        n_train = min(self.n, self.k * cfg.max_points_per_centroid)
        rows = np.sort(rng.choice(self.n, n_train, replace=False)) if n_train < self.n else np.arange(self.n)
        shard_of = np.searchsorted(self.offsets, rows, side="right") - 1
        sample = np.empty((len(rows), self.d), np.float32)  # (n_train, d): read shard by shard
        for s in np.unique(shard_of):
            sel = shard_of == s
            sample[sel] = self.shards[s][rows[sel] - self.offsets[s]]
        km = faiss.Kmeans(
            self.d, self.k, niter=cfg.kmeans_iters, spherical=True, seed=cfg.seed, gpu=self.gpu,
            min_points_per_centroid=1, max_points_per_centroid=cfg.max_points_per_centroid, verbose=False,
        )  # fmt: skip
        km.train(sample)
        c = km.centroids.astype(np.float32)
        return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)

    def _lloyd_sums(self, c: np.ndarray) -> np.ndarray:
        """(k, d) float64 per-centroid sums of this rank's rows (top-1 assignment): exact, see top."""
        from scipy.sparse import csr_matrix

        index = self._index(c)
        sums = np.zeros((self.k, self.d), np.float64)
        for s in self.mine:
            for _, xb in self._blocks(s):
                _, top = index.search(xb, 1)
                onehot = csr_matrix(
                    (np.ones(len(xb)), (top[:, 0], np.arange(len(xb)))), shape=(self.k, len(xb))
                )
                sums += onehot @ xb.astype(np.float64)
        return sums

    def _kmeans(self) -> None:
        c = None
        if self.rank == 0:
            p0 = self._centroids(0)
            c = np.load(p0) if p0.is_file() else self._train()
            if not p0.is_file():
                atomic_save_npy(p0, c)
        c = self.comm.broadcast(c, (self.k, self.d), torch.float32)
        for p in range(1, self.cfg.refine_passes + 1):
            self.comm.barrier()
            path = self._centroids(p)
            if path.is_file():  # written by rank 0 before the barrier above: all ranks agree
                c = np.load(path)
                continue
            sums = self.comm.all_reduce_sum(self._lloyd_sums(c))
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            fresh = (sums / np.maximum(norms, 1e-12)).astype(np.float32)
            c = np.where(norms > 0, fresh, c)  # an empty cluster keeps its centroid
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
            rows = np.repeat(np.arange(len(assign)), self.a)  # one entry per (row, cluster)
            clusters = assign.ravel()
            for r in range(self.world):
                sel = clusters % self.world == r
                meta = np.column_stack([rows[sel] + self.offsets[s], clusters[sel], assign[rows[sel]]])
                meta_p, vec_p = self._route(s, r)
                atomic_save_npy(vec_p, np.asarray(self.shards[s][rows[sel]]))  # (e, d) float16
                atomic_save_npy(meta_p, meta)  # (e, 2 + a): global row, cluster, its a clusters
            done.touch()

    # ------------------------------------------------------------------------------------- search
    def _search(self) -> None:
        out = self.work / "pairs" / f"rank_{self.rank:04d}.npz"
        if out.is_file():
            self.stats["search_resumed"] = True
            return
        metas = [np.load(self._route(s, self.rank)[0]) for s in range(self.n_shards)]
        meta = np.concatenate(metas) if metas else np.zeros((0, 2 + self.a), np.int64)
        order = np.lexsort((meta[:, 0], meta[:, 1]))  # by cluster, rows ascending inside it
        meta = meta[order]
        # Received vectors in (cluster, row) order, in one memory-mapped file: a cluster is a slice.
        vec_path = self.work / "search" / f"rank_{self.rank:04d}.vec.npy"
        vec_path.parent.mkdir(parents=True, exist_ok=True)
        vecs = np.lib.format.open_memmap(vec_path, "w+", np.float16, (len(meta), self.d))
        where = np.empty(len(order), np.int64)
        where[order] = np.arange(len(order))  # position in the sorted file of each received entry
        start = 0
        for s, m in enumerate(metas):
            vecs[where[start : start + len(m)]] = np.load(self._route(s, self.rank)[1])
            start += len(m)
        vecs.flush()
        clusters, bounds = np.unique(meta[:, 1], return_index=True)
        bounds = np.append(bounds, len(meta))
        dev = self._torch_device()
        out_i, out_j, out_s = [], [], []
        computed, t0 = 0, time.perf_counter()
        for c, b0, b1 in zip(clusters, bounds[:-1], bounds[1:]):
            if b1 - b0 < 2:
                continue
            computed += (b1 - b0) * (b1 - b0 - 1) // 2
            li, lj, sim = local_pairs(
                np.asarray(vecs[b0:b1], dtype=np.float32), self.cfg.threshold, self.cfg, dev
            )
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
        del vecs
        vec_path.unlink()
        self.stats["search_only_s"] = round(time.perf_counter() - t0, 3)

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
        self._stage("kmeans", self._kmeans)
        self._stage("assign", self._assign)
        self._stage("search", self._search)
        self._stage("groups", self._groups)
        self.stats["total_s"] = round(time.perf_counter() - t0, 3)
        self.stats["peak_rss_mb"] = round(rank_peak_rss_mb(), 1)
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
