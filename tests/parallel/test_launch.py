"""The multi-rank test launcher and the mesh arithmetic."""

import pytest
import torch
import torch.distributed as dist

from herd.parallel.dims import ParallelDims, ParallelLayoutError
from herd.parallel.launch import spawn_ranks


def _all_reduce_rank(offset):
    t = torch.tensor([dist.get_rank() + offset])
    dist.all_reduce(t)
    return int(t)


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return 0


def _mesh_coordinates(dims_kwargs):
    dims = ParallelDims(**dims_kwargs, world_size=dist.get_world_size())
    mesh = dims.build_mesh("cpu")
    rank = dist.get_rank()
    got = {name: mesh[name].get_local_rank() for name in ("dp_replicate", "dp_shard", "pp", "cp", "tp")}
    return got == dims.coords(rank), mesh["dp_cp"].size(), mesh["dp"].get_local_rank() == dims.dp_rank(rank)


def test_spawn_ranks_collects_results_in_rank_order():
    assert spawn_ranks(_all_reduce_rank, 4, 1) == [10, 10, 10, 10]


def test_spawn_ranks_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*boom on purpose"):
        spawn_ranks(_fail_on_rank_one, 2, timeout_s=60)


def test_dims_infer_and_validate():
    assert ParallelDims(tp=2, pp=2, world_size=16).dp_shard == 4
    with pytest.raises(ParallelLayoutError, match="world size 6 is not divisible"):
        ParallelDims(tp=4, world_size=6)
    with pytest.raises(ParallelLayoutError, match="but the world size is 8"):
        ParallelDims(dp_shard=2, tp=2, world_size=8)
    # TP innermost: consecutive ranks differ in tp first, then cp, then pp, then dp
    d = ParallelDims(dp_shard=2, pp=2, cp=2, tp=2, world_size=16)
    assert [d.coords(r)["tp"] for r in range(4)] == [0, 1, 0, 1]
    assert d.coords(2) == {"dp_replicate": 0, "dp_shard": 0, "pp": 0, "cp": 1, "tp": 0}
    assert d.coords(8)["dp_shard"] == 1 and d.dp_rank(8) == 1


def test_device_mesh_matches_the_arithmetic():
    results = spawn_ranks(_mesh_coordinates, 8, {"dp_shard": 2, "cp": 2, "tp": 2})
    assert all(ok and dp_ok and dp_cp == 4 for ok, dp_cp, dp_ok in results)
