"""Parallel degrees and the device mesh: the one object that owns the mesh arithmetic.

Mesh dimensions, innermost → outermost, are the paper's **[TP, CP, PP, DP]** (§3.3.2): TP varies fastest
(neighbouring ranks, i.e. inside a node, where bandwidth is highest), data parallelism outermost. The
DP degree is `dp_replicate × dp_shard` (HSDP when dp_replicate > 1). `init_device_mesh` takes shapes
outermost first, so the mesh is (dp_replicate, dp_shard, pp, cp, tp).
"""

from __future__ import annotations

from dataclasses import dataclass

MESH_DIM_NAMES = ("dp_replicate", "dp_shard", "pp", "cp", "tp")


class ParallelLayoutError(ValueError):
    pass


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after the other degrees
    cp: int = 1
    pp: int = 1
    tp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ParallelLayoutError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        others = self.dp_replicate * self.cp * self.pp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ParallelLayoutError(
                    f"world size {self.world_size} is not divisible by dp_replicate×cp×pp×tp = "
                    f"{self.dp_replicate}×{self.cp}×{self.pp}×{self.tp} = {others}"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ParallelLayoutError(f"parallel.dp_shard must be >= 1 or -1, got {self.dp_shard}")
        if others * self.dp_shard != self.world_size:
            raise ParallelLayoutError(
                f"dp_replicate×dp_shard×pp×cp×tp = {self.dp_replicate}×{self.dp_shard}×{self.pp}×{self.cp}×"
                f"{self.tp} = {others * self.dp_shard}, but the world size is {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dp_replicate, self.dp_shard, self.pp, self.cp, self.tp)

    @property
    def fsdp_enabled(self) -> bool:
        # CP ranks hold different tokens, so their gradients need reducing too: they join FSDP's mesh.
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    @property
    def non_trivial(self) -> bool:
        return self.world_size > 1

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of a global rank (pure arithmetic; no process group needed)."""
        out, rest = {}, rank
        for name, size in reversed(list(zip(MESH_DIM_NAMES, self.shape))):
            out[name] = rest % size
            rest //= size
        return {name: out[name] for name in MESH_DIM_NAMES}

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def build_mesh(self, device_type: str = "cpu"):
        """The 5-d DeviceMesh plus flattened views: "dp" (replicate×shard), "dp_shard_cp" (what FSDP
        shards over), "dp_cp" (what the loss/target counts are reduced over)."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIM_NAMES)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh
