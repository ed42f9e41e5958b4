"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over data parallel ranks.

Each Transformer block is one unit (its parameters are all-gathered just before it runs and freed
after), the root holds the rest (embedding, final norm, head). Compute in `param_dtype` (bf16 on
GPUs), gradients reduce-scattered in `reduce_dtype` (fp32, as the paper does), and because the
sharded master parameters stay fp32, gradients accumulate in fp32 across micro-batches. HSDP: a 2-d
mesh (replicate, shard) shards inside a group and all-reduces across groups.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from herd.text.model import TransformerBlock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    param_dtype: str = "fp32",
    reduce_dtype: str = "fp32",
    reshard_after_forward: bool = True,
) -> None:
    """Shard every TransformerBlock (and every frozen-free submodule of composed models) and the root."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def fsdp_modules(modules: list[nn.Module]) -> list[FSDPModule]:
    return [m for root in modules for m in root.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch (gradients accumulate locally, fp32)."""
    for m in modules:
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled)


__all__ = ["apply_fsdp", "fsdp_modules", "set_gradient_sync"]
