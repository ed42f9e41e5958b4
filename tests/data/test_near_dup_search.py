"""Near-duplicate search on constructed embeddings: every method equals brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from herd.data.curation.near_dup_search import (
    Pairs,
    SearchConfig,
    connected_groups,
    exact_neighbors,
    find_pairs,
    same_partition,
)

pytest.importorskip("faiss")


def planted(n: int = 3000, d: int = 64, groups: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors; `groups` of 2–6 rows rewritten as noisy copies of a base row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.arange(n)
    rows = rng.permutation(n)
    used = 0
    for _ in range(groups):
        size = int(rng.integers(2, 7))
        g = rows[used : used + size]
        used += size
        noise = rng.standard_normal((size - 1, d)).astype(np.float32) * rng.uniform(0.05, 0.35) / np.sqrt(d)
        y = x[g[0]] + noise
        x[g[1:]] = y / np.linalg.norm(y, axis=1, keepdims=True)
        truth[g] = g[0]
    return x, truth


def brute_force_labels(x: np.ndarray, t: float) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Independent reference: dense all-pairs similarity + scipy components."""
    s = x @ x.T
    i, j = np.nonzero(np.triu(s >= t, 1))
    g = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(x), len(x)))
    _, labels = connected_components(g, directed=False)
    return labels, set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(threshold=0.9, method="exact"),
        SearchConfig(threshold=0.9, method="clusters", n_clusters=24),
        SearchConfig(threshold=0.9, method="clusters", n_clusters=24, backend="torch"),
        SearchConfig(threshold=0.9, method="clusters", n_clusters=24, max_block_elems=500),  # tiny blocks
        SearchConfig(threshold=0.9, method="ivf", n_clusters=24, nprobe=6, k=2),  # k doubling exercised
    ],
    ids=["exact", "clusters", "clusters-torch", "clusters-small-blocks", "ivf"],
)
def test_components_equal_brute_force(cfg: SearchConfig) -> None:
    x, truth = planted()
    ref_labels, ref_pairs = brute_force_labels(x, cfg.threshold)
    p = find_pairs(x, cfg)
    got = set(zip(p.i.tolist(), p.j.tolist()))
    assert len(got) == len(p), "a pair was reported twice"
    assert np.all(p.i < p.j)
    assert got == ref_pairs
    np.testing.assert_allclose(p.sim, np.sum(x[p.i] * x[p.j], axis=1), atol=1e-5)
    labels = connected_groups(len(x), p)
    assert same_partition(labels, ref_labels)
    # The planted groups are what brute force finds at this threshold (noise ≤ 0.35/√d).
    assert same_partition(labels, truth)
    assert len(np.unique(labels)) == len(x) - sum(len(g) - 1 for g in np.split(*_groups(truth)))


def _groups(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(truth, kind="stable")
    bounds = np.nonzero(np.diff(truth[order]))[0] + 1
    return order, bounds


def test_cluster_search_counts_work_and_respects_nprobe_assign() -> None:
    x, _ = planted(n=2000)
    p1 = find_pairs(x, SearchConfig(threshold=0.9, n_clusters=16, nprobe_assign=1))
    p2 = find_pairs(x, SearchConfig(threshold=0.9, n_clusters=16, nprobe_assign=2))
    assert p1.stats["nprobe_assign"] == 1 and p2.stats["nprobe_assign"] == 2
    # Each vector sits in `a` clusters: about a² times the similarity work of one assignment.
    ratio = p2.stats["similarities_computed"] / p1.stats["similarities_computed"]
    assert 2.5 < ratio < 6.0
    assert p2.stats["similarities_computed"] < len(x) * (len(x) - 1) / 2 / 2  # far below all pairs
    assert set(p1.keys(len(x))) <= set(p2.keys(len(x)))  # more probes only add pairs


def test_chain_is_one_group_and_partition_helper() -> None:
    p = Pairs(np.array([0, 1, 4]), np.array([1, 2, 5]), np.ones(3, np.float32))
    labels = connected_groups(6, p)
    assert labels[0] == labels[1] == labels[2] and labels[4] == labels[5]
    assert len({labels[0], labels[3], labels[4]}) == 3
    assert same_partition(np.array([0, 0, 1]), np.array([5, 5, 2]))
    assert not same_partition(np.array([0, 0, 1]), np.array([5, 2, 2]))


def test_exact_neighbors_sample_matches_dense() -> None:
    x, _ = planted(n=800)
    q = np.array([3, 10, 500, 799])
    got = exact_neighbors(x, q, 0.9)
    s = x[q] @ x.T
    want = set()
    for r, qq in enumerate(q):
        for j in np.nonzero(s[r] >= 0.9)[0]:
            if j != qq:
                want.add((min(qq, j), max(qq, j)))
    assert set(zip(got.i.tolist(), got.j.tolist())) == want


def test_degenerate_inputs() -> None:
    assert len(find_pairs(np.zeros((1, 8), np.float32), SearchConfig(threshold=0.5))) == 0
    x = np.ones((5, 4), np.float32) / 2.0  # five identical vectors: one group of 5, 10 pairs
    p = find_pairs(x, SearchConfig(threshold=0.99, n_clusters=2))
    assert len(p) == 10
    assert len(np.unique(connected_groups(5, p))) == 1
    with pytest.raises(ValueError):
        find_pairs(np.zeros(5, np.float32), SearchConfig())
