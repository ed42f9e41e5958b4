"""Benchmark: the sharded image near-duplicate search on 1, 2, 4 CPU ranks (gloo), planted set (JSON).

    .venv/bin/python benchmarks/dedup_sharded.py --n 100000 --worlds 1 2 4   # docs/data.md numbers

Data: the planted random 512-d set of benchmarks/dedup.py (same generator and seed), saved as one
float32 .npy that the ranks read memory-mapped into float16 shards. Every world size runs in fresh
processes started with `spawn` (so a rank's peak RSS is its own, not inherited from this parent):
  * `sharded_w{W}`: `sharded_dup_search` stages on W gloo ranks — wall time (process start included),
    per-stage times, each rank's peak RSS, pair recall against the planted pairs;
  * `today_single`: today's single-process `find_pairs` on the whole float32 matrix, for the
    pair-set comparison (the sharded search stores float16, see docs/data.md).
The pair lists of all world sizes are checked to be identical. Not part of the test suite.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup import make_data, planted_pairs  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(args: argparse.Namespace):
    from herd.data.curation.near_dup_search import SearchConfig

    return SearchConfig(threshold=args.threshold, seed=args.seed, n_clusters=args.n_clusters)


def _rank(rank: int, world: int, port: int, npy: str, work: str, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # one node: with faiss-gpu, rank r uses GPU r
    import faiss  # noqa: F401 - imported before the baseline so that it counts in it

    from herd.data.curation.sharded_dup_search import rank_peak_rss_mb, sharded_pairs, shards_from_npy

    base = rank_peak_rss_mb()  # the process before any data: python + torch + faiss
    Path(work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_shards = shards_from_npy(npy, work, args.shard_rows, rank, world)
    shards_s = time.perf_counter() - t0
    pairs = sharded_pairs(work, n_shards, _cfg(args), rank, world)
    Path(work, f"rss_{rank}.json").write_text(json.dumps({"baseline": base, "peak": rank_peak_rss_mb()}))
    if rank == 0:
        np.save(Path(work) / "keys.npy", pairs.i * args.n + pairs.j)
        Path(work, "shards_s.json").write_text(json.dumps({"shards_s": shards_s}))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _today(_: int, npy: str, out: str, args: argparse.Namespace) -> None:
    import faiss  # noqa: F401

    from herd.data.curation.near_dup_search import find_pairs
    from herd.data.curation.sharded_dup_search import rank_peak_rss_mb

    base = rank_peak_rss_mb()
    t0 = time.perf_counter()
    p = find_pairs(np.load(npy), _cfg(args))
    np.save(Path(out) / "keys.npy", p.keys(args.n))
    rss = rank_peak_rss_mb()
    Path(out, "stats.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0, "peak_rss_mb": rss, "baseline_rss_mb": base,
                                                   "stats": {k: v for k, v in p.stats.items()}}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--shard-rows", type=int, default=16384)
    ap.add_argument("--threshold", type=float, default=0.75)
    ap.add_argument("--n-clusters", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-today", action="store_true", help="no single-process find_pairs comparison")
    ap.add_argument("--tmp", default=None, help="folder for the .npy and work folders (default: a temp dir)")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    x, groups = make_data(args.n, args.d, 0.1, 0.85, args.seed)
    planted = planted_pairs(x, groups, args.threshold)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        npy = Path(tmp) / "x.npy"
        np.save(npy, x)
        del x
        res: dict = {"n": args.n, "d": args.d, "threshold": args.threshold, "planted_pairs": len(planted),
                     "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
        keys = {}
        if not args.skip_today:
            out = Path(tmp) / "today"
            out.mkdir()
            t0 = time.perf_counter()
            mp.start_processes(_today, args=(str(npy), str(out), args), nprocs=1, start_method="spawn")
            st = json.loads((out / "stats.json").read_text())
            keys["today"] = np.load(out / "keys.npy")
            res["today_single"] = {
                "wall_s_with_start": round(time.perf_counter() - t0, 1), "search_s": round(st["wall_s"], 1),
                "peak_rss_mb": round(st["peak_rss_mb"], 1),
                "peak_rss_mb_above_baseline": round(st["peak_rss_mb"] - st["baseline_rss_mb"], 1),
                "pairs": len(keys["today"]),
                "pair_recall": round(float(np.isin(planted, keys["today"]).mean()), 5),
            }  # fmt: skip
        for world in args.worlds:
            work = Path(tmp) / f"w{world}"
            t0 = time.perf_counter()
            mp.start_processes(_rank, args=(world, _port(), str(npy), str(work), args), nprocs=world,
                               start_method="spawn")  # fmt: skip
            wall = time.perf_counter() - t0
            keys[world] = np.load(work / "keys.npy")
            for big in ("shards", "route", "search"):  # the next world size needs the disk
                shutil.rmtree(work / big, ignore_errors=True)
            ranks = [json.loads(p.read_text()) for p in sorted((work / "rank_stats").glob("rank_*.json"))]
            rss = [json.loads((work / f"rss_{r}.json").read_text()) for r in range(world)]
            res[f"sharded_w{world}"] = {
                "wall_s_with_start": round(wall, 1),
                "shards_s_rank0": round(json.loads((work / "shards_s.json").read_text())["shards_s"], 1),
                "stage_s_rank0": {k: ranks[0].get(f"{k}_s") for k in ("kmeans", "assign", "search", "groups")},
                "search_s_per_rank": [r.get("search_s") for r in ranks],
                # the run's peak: the rank's own record (the per-stage peaks restart VmHWM, see
                # sharded_dup_search.reset_peak_rss), or VmHWM at the end where that is larger
                "peak_rss_mb_per_rank": [round(max(r["peak"], st["peak_rss_mb"]), 1) for st, r in zip(ranks, rss)],
                "peak_rss_mb_above_baseline_per_rank": [
                    round(max(r["peak"], st["peak_rss_mb"]) - r["baseline"], 1) for st, r in zip(ranks, rss)
                ],
                "stage_peak_rss_mb_above_baseline_per_rank": {
                    k: [round(st[f"{k}_peak_rss_mb"] - r["baseline"], 1) for st, r in zip(ranks, rss)]
                    for k in ("kmeans", "assign", "search") if f"{k}_peak_rss_mb" in ranks[0]
                },
                "pairs": len(keys[world]),
                "pair_recall": round(float(np.isin(planted, keys[world]).mean()), 5),
            }  # fmt: skip
        first = keys[args.worlds[0]]
        res["pairs_identical_across_worlds"] = all(np.array_equal(first, keys[w]) for w in args.worlds)
        if "today" in keys:
            t = keys["today"]
            res["sharded_vs_today"] = {"only_sharded": int(np.setdiff1d(first, t).size),
                                       "only_today": int(np.setdiff1d(t, first).size)}  # fmt: skip
    res["loadavg"] = os.getloadavg()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
