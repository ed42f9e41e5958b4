"""Image near-duplicate search over 2 and 4 gloo ranks equals world size 1 exactly; kill + restart."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from herd.data.curation import sharded_dup_search as sds
from herd.data.curation.near_dup_search import SearchConfig, connected_groups, find_pairs, same_partition

pytest.importorskip("faiss")
os.environ.setdefault("OMP_NUM_THREADS", "1")

CFG = SearchConfig(threshold=0.9, n_clusters=24, seed=0)
SHARD_ROWS = 500


def planted(n: int = 3000, d: int = 32, groups: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors; `groups` of 2–6 rows rewritten as noisy copies of a base row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.arange(n)
    rows = rng.permutation(n)
    used = 0
    for _ in range(groups):
        g = rows[used : used + int(rng.integers(2, 7))]
        used += len(g)
        y = x[g[0]] + rng.standard_normal((len(g) - 1, d)).astype(np.float32) * 0.2 / np.sqrt(d)
        x[g[1:]] = y / np.linalg.norm(y, axis=1, keepdims=True)
        truth[g] = g[0]
    return x, truth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, npy: str, work: str, fail_rank: int, fail_step: int) -> None:
    """One rank as torchrun would start it (env:// rendezvous, gloo)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if rank == fail_rank and fail_step:  # a crash in k-means Lloyd step `fail_step`, before its all-reduce
        real_step = sds.ShardedSearch._lloyd_step
        steps = {"n": 0}

        def crashing_step(self, c, sample):
            steps["n"] += 1
            if steps["n"] == fail_step:
                raise RuntimeError("injected failure")
            return real_step(self, c, sample)

        sds.ShardedSearch._lloyd_step = crashing_step
    elif rank == fail_rank == 0:  # rank 0 crashes in the assign stage after routing its first shard
        real_route = sds.ShardedSearch._route
        routed = {"n": 0}

        def crashing_route(self, s, r):
            routed["n"] += 1
            if routed["n"] > world:  # the second shard of this rank
                raise RuntimeError("injected failure")
            return real_route(self, s, r)

        sds.ShardedSearch._route = crashing_route
    elif rank == fail_rank:  # a crash in the middle of the search stage, after some clusters
        calls = {"n": 0}
        real = sds.local_pairs

        def crashing(*a, **kw):
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("injected failure")
            return real(*a, **kw)

        sds.local_pairs = crashing
    n_shards = sds.shards_from_npy(npy, work, SHARD_ROWS, rank, world)
    pairs = sds.sharded_pairs(work, n_shards, CFG, rank, world)
    if rank == 0:
        np.savez(Path(work) / "result.npz", i=pairs.i, j=pairs.j, sim=pairs.sim)
    import torch.distributed as dist

    dist.destroy_process_group()


def run_ranks(
    world: int, npy: Path, work: Path, fail_rank: int = -1, fail_step: int = 0
) -> dict[str, np.ndarray]:
    import torch.multiprocessing as mp

    # fork: the children reuse the imported torch/faiss (spawning re-imports them: ~5 s per rank here);
    # safe because the parent ran faiss with one OpenMP thread (OMP_NUM_THREADS=1, set below).
    args = (world, _free_port(), str(npy), str(work), fail_rank, fail_step)
    mp.start_processes(_rank, args=args, nprocs=world, join=True, start_method="fork")
    z = np.load(work / "result.npz")
    return {k: z[k] for k in ("i", "j", "sim")}


def run_single(npy: Path, work: Path) -> dict[str, np.ndarray]:
    n_shards = sds.shards_from_npy(npy, work, SHARD_ROWS, 0, 1)
    p = sds.sharded_pairs(work, n_shards, CFG, 0, 1)
    return {"i": p.i, "j": p.j, "sim": p.sim}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    import faiss

    faiss.omp_set_num_threads(1)  # the forked ranks must not inherit a running OpenMP pool
    tmp = tmp_path_factory.mktemp("sharded")
    x, truth = planted()
    np.save(tmp / "x.npy", x)
    return tmp / "x.npy", x, truth, run_single(tmp / "x.npy", tmp / "w1")


def test_world_1_equals_brute_force_and_todays_search(data) -> None:
    npy, x, truth, single = data
    xf = x.astype(np.float16).astype(np.float32)  # what the shards store
    s = xf @ xf.T
    bi, bj = np.nonzero(np.triu(s >= CFG.threshold, 1))
    assert set(zip(single["i"].tolist(), single["j"].tolist())) == set(zip(bi.tolist(), bj.tolist()))
    labels = connected_groups(len(x), sds.Pairs(single["i"], single["j"], single["sim"]))
    assert same_partition(labels, truth)
    today = find_pairs(x, CFG)  # the float32 single-process search of today: same groups
    assert same_partition(labels, connected_groups(len(x), today))


def test_torch_in_cluster_search_equals_faiss(data, tmp_path: Path, monkeypatch) -> None:
    """backend="torch" is the in-cluster search a GPU rank runs (torch matmuls on cuda:LOCAL_RANK);
    on CPU it must find the faiss backend's pairs, with the same similarities to float32 rounding."""
    from dataclasses import replace

    npy, _, _, single = data
    devices, real = set(), sds.local_pairs
    monkeypatch.setattr(
        sds, "local_pairs", lambda x, t, cfg, dev: devices.add(str(dev)) or real(x, t, cfg, dev)
    )
    n_shards = sds.shards_from_npy(npy, tmp_path, SHARD_ROWS, 0, 1)
    got = sds.sharded_pairs(tmp_path, n_shards, replace(CFG, backend="torch"), 0, 1)
    np.testing.assert_array_equal(got.i, single["i"])
    np.testing.assert_array_equal(got.j, single["j"])
    np.testing.assert_allclose(got.sim, single["sim"], atol=1e-6)
    assert devices == {"cpu"}  # every cluster went through the torch path


def test_four_ranks_equal_single_process_exactly(data, tmp_path: Path) -> None:
    npy, x, _, single = data
    world = 4
    got = run_ranks(world, npy, tmp_path)
    for k in ("i", "j", "sim"):
        np.testing.assert_array_equal(got[k], single[k])  # same pairs, same order, same similarities
    stats = [json.loads((tmp_path / "rank_stats" / f"rank_{r:04d}.json").read_text()) for r in range(world)]
    assert [s["rank"] for s in stats] == list(range(world))
    if sds.reset_peak_rss():  # Linux: each stage's own peak, under the run's peak (kept across resets)
        for st in stats:
            stage_peaks = [st[f"{k}_peak_rss_mb"] for k in ("kmeans", "assign", "search", "groups")]
            assert min(stage_peaks) > 0 and max(stage_peaks) <= st["peak_rss_mb"]
    entries = json.loads(np.load(tmp_path / "pairs_all.npz")["stats"].item())["entries_per_rank"]
    assert sum(entries) == len(x) * CFG.nprobe_assign  # every (row, cluster) entry went to one rank
    assert max(entries) < 1.6 * len(x) * CFG.nprobe_assign / world  # spread ~1/world, none holds all


def test_two_ranks_kill_one_mid_search_restart_equal_single_process(data, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    npy, _, _, single = data
    with pytest.raises(mp.ProcessRaisedException, match="injected failure"):
        run_ranks(2, npy, tmp_path, fail_rank=1)
    assert (tmp_path / "kmeans.done").is_file() and (tmp_path / "assign.done").is_file()
    assert not (tmp_path / "search.done").exists() and not (tmp_path / "rank_stats").exists()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "route").glob("*.npy")}
    kept[tmp_path / "kmeans" / "centroids_2.npy"] = (
        (tmp_path / "kmeans" / "centroids_2.npy").stat().st_mtime_ns
    )
    got = run_ranks(2, npy, tmp_path)
    for k in ("i", "j", "sim"):
        np.testing.assert_array_equal(got[k], single[k])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished stages were not redone
    for r in range(2):
        st = json.loads((tmp_path / "rank_stats" / f"rank_{r:04d}.json").read_text())["stages"]
        assert st == {"kmeans": "skipped", "assign": "skipped", "search": "ran", "groups": "ran"}
    with pytest.raises(ValueError, match="started with"):  # a different world size is refused
        run_single(npy, tmp_path)


def test_cli_sharded_search_equals_single_search(data, tmp_path: Path) -> None:
    from synthetic_inputs import write_jsonl

    from herd.commands import build_parser
    from herd.data.records import read_jsonl

    npy, x, _, _ = data
    rows = [{"id": f"r{i}", "image": f"/nowhere/{i}.png", "clip_score": float(i % 7)} for i in range(len(x))]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    common = ["data", "dedup-images", "--manifest", str(manifest), "--embeddings", str(npy), "--threshold", "0.9",
              "--n-clusters", "24", "--contact-groups", "1"]  # fmt: skip
    for mode, extra in (("single", []), ("sharded", ["--shard-rows", "700"])):
        args = build_parser().parse_args([*common, "--out", str(tmp_path / mode), "--search", mode, *extra])
        assert args.func(args) == 0
    assert read_jsonl(tmp_path / "sharded" / "keep.jsonl") == read_jsonl(tmp_path / "single" / "keep.jsonl")
    groups = [read_jsonl(tmp_path / m / "groups.jsonl") for m in ("single", "sharded")]
    assert groups[0] == groups[1] and len(groups[0]) == 150
    rep = json.loads((tmp_path / "sharded" / "report.json").read_text())
    assert rep["search"]["method"] == "clusters-sharded" and rep["search"]["ranks"][0]["peak_rss_mb"] > 0


def test_four_ranks_kill_rank_0_mid_assign_and_restart(data, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    npy, _, _, single = data
    with pytest.raises(mp.ProcessRaisedException, match="injected failure"):
        run_ranks(4, npy, tmp_path, fail_rank=0)
    assert (tmp_path / "kmeans.done").is_file() and not (tmp_path / "assign.done").exists()
    first = tmp_path / "route" / "s00000.done"  # rank 0 finished shard 0 before it crashed on shard 4
    assert first.is_file() and not (tmp_path / "route" / "s00004.done").exists()
    stamp = first.stat().st_mtime_ns
    got = run_ranks(4, npy, tmp_path)
    for k in ("i", "j", "sim"):
        np.testing.assert_array_equal(got[k], single[k])
    assert first.stat().st_mtime_ns == stamp
    st = json.loads((tmp_path / "rank_stats" / "rank_0000.json").read_text())["stages"]
    assert st == {"kmeans": "skipped", "assign": "ran", "search": "ran", "groups": "ran"}


def test_two_ranks_kill_one_mid_kmeans_restart_equal_single_process(data, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    npy, _, _, single = data
    with pytest.raises(mp.ProcessRaisedException, match="injected failure"):
        run_ranks(2, npy, tmp_path, fail_rank=1, fail_step=4)  # the 4th sample Lloyd iteration
    km = tmp_path / "kmeans"
    done = [km / f"sample_{t}.npy" for t in range(4)]  # the initial rows and 3 iterations
    assert all(p.is_file() for p in done) and not (km / "sample_4.npy").exists()
    assert not (tmp_path / "kmeans.done").exists()
    stamps = [p.stat().st_mtime_ns for p in done]
    got = run_ranks(2, npy, tmp_path)
    for k in ("i", "j", "sim"):
        np.testing.assert_array_equal(got[k], single[k])
    assert [p.stat().st_mtime_ns for p in done] == stamps  # finished k-means steps were not redone
    for p in sorted(km.glob("*.npy")):  # every step's centroids equal the single process' exactly
        np.testing.assert_array_equal(np.load(p), np.load(npy.parent / "w1" / "kmeans" / p.name))


MEM_CFG = SearchConfig(threshold=0.9, n_clusters=8, max_points_per_centroid=512, block_rows=64, seed=0)


def _kmeans_probe(rank: int, world: int, port: int, npy: str, work: str) -> None:
    """One rank of the k-means memory test: records how often it read each sample row, its largest
    read, and the peak of traced allocations (numpy arrays) during the kmeans stage."""
    import tracemalloc

    import scipy.sparse  # noqa: F401 - imported before tracing: module objects are no working set

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    probe: dict = {"block": 0}
    real_blocks, real_kmeans = sds.ShardedSearch._sample_blocks, sds.ShardedSearch._kmeans

    def spy_blocks(self, s, local):
        np.add.at(probe["reads"], local + self.offsets[s], 1)  # counts allocated before tracing
        for xb in real_blocks(self, s, local):
            probe["block"] = max(probe["block"], len(xb))
            yield xb

    def traced_kmeans(self):
        probe["reads"] = np.zeros(self.n, np.int64)  # (n,) reads per row
        tracemalloc.start()
        real_kmeans(self)
        probe["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    sds.ShardedSearch._sample_blocks, sds.ShardedSearch._kmeans = spy_blocks, traced_kmeans
    n_shards = sds.shards_from_npy(npy, work, SHARD_ROWS, rank, world)
    sds.sharded_pairs(work, n_shards, MEM_CFG, rank, world)
    reads = probe.pop("reads")
    probe.update(rows=np.nonzero(reads)[0].tolist(), reads=int(reads.sum()))
    (Path(work) / f"probe_{rank}.json").write_text(json.dumps(probe))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def test_kmeans_rank_reads_only_its_share_of_the_sample(tmp_path: Path) -> None:
    """No rank materialises the k-means sample: each reads the sample rows of its own shards only,
    block_rows at a time, and its traced peak in the stage stays far below the sample's size."""
    import torch.multiprocessing as mp

    x, _ = planted(n=8000, d=256, groups=100, seed=1)
    np.save(tmp_path / "x.npy", x)
    n_train = 8 * MEM_CFG.max_points_per_centroid  # 4096 of the 8000 rows expected
    rows = np.nonzero(sds.row_uniforms(MEM_CFG.seed, 0, len(x)) < n_train / len(x))[0]  # the sample's rows
    assert abs(len(rows) - n_train) < 5 * np.sqrt(n_train)  # binomial around n_train
    sample_bytes = n_train * x.shape[1] * 4  # the float32 sample rank 0 used to hold: 4 MiB
    for world in (1, 2):
        work = tmp_path / f"w{world}"
        args = (world, _free_port(), str(tmp_path / "x.npy"), str(work))
        mp.start_processes(_kmeans_probe, args=args, nprocs=world, join=True, start_method="fork")
        probes = [json.loads((work / f"probe_{r}.json").read_text()) for r in range(world)]
        for r, p in enumerate(probes):
            own = rows[(rows // SHARD_ROWS) % world == r]  # sample rows in rank r's shards
            assert p["rows"] == own.tolist()  # its own sample rows, nobody else's
            assert p["reads"] == MEM_CFG.kmeans_iters * len(own)  # once per sample iteration
            assert 0 < p["block"] <= MEM_CFG.block_rows  # a block at a time
            # ~0.5 MB measured (a block of 64 rows in float32 + float64, the row lists, scipy's
            # and numpy's caches); the old rank 0 held the 4 MiB sample itself.
            assert p["peak_bytes"] < sample_bytes / 4, (world, r, p["peak_bytes"])
    for f in sorted((tmp_path / "w1" / "kmeans").glob("*.npy")):  # bit-identical centroids, every step
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "w2" / "kmeans" / f.name))


def _splitmix64_reference(state: int, count: int) -> list[int]:
    """Vigna's splitmix64 `next()` (prng.di.unimi.it/splitmix64.c), one Python int at a time."""
    out, mask = [], (1 << 64) - 1
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_row_uniforms_are_splitmix64(seed: int) -> None:
    """Row r's value is output r of splitmix64 started one step before the seed's offset, top 53 bits:
    the vectorised uint64 arithmetic (wrapping mod 2^64) equals the reference bit for bit."""
    offset = (0xD1B54A32D192ED03 * (seed + 1)) % (1 << 64)
    ref = _splitmix64_reference((offset - 0x9E3779B97F4A7C15) % (1 << 64), 1000)
    expect = np.array([(z >> 11) * 2.0**-53 for z in ref])
    np.testing.assert_array_equal(sds.row_uniforms(seed, 0, 1000), expect)
    np.testing.assert_array_equal(sds.row_uniforms(seed, 400, 600), expect[400:])  # any start, alone


def test_sample_needs_nothing_n_long() -> None:
    """At n = 12M rows (1M-row shards, one rank), choosing the k-means sample (n/30 rows) and the
    initial centroids traces under 10 % of one n-long int64 array (numpy's choice allocated all of
    it for any sample above n/50 rows), the rank keeps exactly the rows with u < rate, and the
    initial rows are the k of smallest u."""
    import tracemalloc

    n, shard, k = 12_000_000, 1_000_000, 1000
    cfg = SearchConfig(max_points_per_centroid=400, seed=3)  # a sample of 400k rows expected
    search = object.__new__(sds.ShardedSearch)
    search.cfg, search.n, search.k, search.rank, search.world = cfg, n, k, 0, 1
    search.sizes = np.full(n // shard, shard, np.int64)
    search.offsets = np.concatenate([[0], np.cumsum(search.sizes)])
    search.mine = list(range(n // shard))
    search.comm = sds.Comm(0, 1)
    tracemalloc.start()
    mine, init = search._my_sample()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.1 * n * 8, peak  # the kept rows (3.2 MB, twice while joined), not 96 MB
    rate = k * cfg.max_points_per_centroid / n
    kept = 0
    for s in search.mine:
        u = sds.row_uniforms(cfg.seed, s * shard, shard)
        np.testing.assert_array_equal(mine[s], np.nonzero(u < rate)[0])
        kept += len(mine[s])
    expected = rate * n  # 400,000 rows
    assert abs(kept - expected) < 5 * np.sqrt(expected)
    u_mine = np.concatenate([sds.row_uniforms(cfg.seed, s * shard, shard) for s in search.mine])
    rows_mine = np.concatenate([np.arange(shard) + s * shard for s in search.mine])
    np.testing.assert_array_equal(init, rows_mine[np.argsort(u_mine, kind="stable")[:k]])
