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

    def build_mesh(self, device_type: str = "cpu") -> Meshes:
        """The 5-d DeviceMesh and its flattened views (see `Meshes`)."""
        from torch.distributed.device_mesh import init_device_mesh

        return Meshes(init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIM_NAMES))


class Meshes:
    """The root mesh plus the flattened meshes the layout needs, kept by hand.

    In the paper's order PP sits between CP and DP, so (dp_shard, cp) are not adjacent in the root
    mesh: torch flattens them, but cannot slice the flattened dim back out of the root afterwards, so
    the flattened meshes are kept here as `_flatten` returns them.
      "dp": dp_replicate × dp_shard (data shards), "dp_shard_cp": what FSDP shards over,
      "dp_cp": what loss and target counts are summed over, `hsdp`: (dp_replicate, dp_shard_cp).
    """

    def __init__(self, root) -> None:
        self.root = root
        self.flat = {
            "dp": root["dp_replicate", "dp_shard"]._flatten("dp"),
            "dp_shard_cp": root["dp_shard", "cp"]._flatten("dp_shard_cp"),
            "dp_cp": root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
        }

    def __getitem__(self, name: str):
        return self.flat[name] if name in self.flat else self.root[name]

    @property
    def hsdp(self):
        """2-d (replicate, shard) mesh for HSDP."""
        try:
            return self.root["dp_replicate", "dp_shard_cp"]
        except (NotImplementedError, KeyError) as e:
            raise NotImplementedError(
                "HSDP (dp_replicate > 1) together with pp > 1 and cp > 1 needs a device-mesh slice torch "
                "2.11 cannot take in the paper's [TP, CP, PP, DP] order; use dp_replicate = 1 (plain FSDP) "
                "or drop pp or cp"
            ) from e
