"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over data parallel ranks.

Each unit the model's parallel plan names (Transformer blocks, image-encoder blocks, cross-attention
blocks) is sharded on its own: its parameters are all-gathered just before it runs and freed after; the
root holds the rest (embedding, final norm, head). Compute in `param_dtype` (bf16 on GPUs), gradients
reduce-scattered in `reduce_dtype` (fp32, as the paper does), and because the sharded master parameters
stay fp32, gradients accumulate in fp32 across micro-batches. HSDP: a 2-d mesh (replicate, shard) shards
inside a group and all-reduces across groups. Frozen parameters (the image adapter's LLM) are sharded
too: no gradient, no optimizer state, 1/dp of the memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def apply_fsdp(
    model: nn.Module,
    units: list[str],
    mesh: DeviceMesh,
    param_dtype: str = "fp32",
    reduce_dtype: str = "fp32",
    reshard_after_forward: bool = True,
    forward_methods: list[tuple[str, str]] = (),
) -> None:
    """Shard each unit (FQNs in forward order), then the root; `forward_methods`: (unit FQN, method) pairs
    that use a unit's parameters outside its `forward` and must all-gather them as well."""
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for i, fqn in enumerate(units):
        # the last unit's parameters are needed again at once by backward: keep them gathered
        fully_shard(
            model.get_submodule(fqn),
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward and i < len(units) - 1,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for fqn, method in forward_methods:
        register_fsdp_forward_method(model.get_submodule(fqn), method)


def fsdp_modules(modules: list[nn.Module]) -> list[FSDPModule]:
    return [m for root in modules for m in root.modules() if isinstance(m, FSDPModule)]


def set_gradient_sync(modules: list[nn.Module], enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch (gradients accumulate locally, fp32)."""
    for m in modules:
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled)


__all__ = ["apply_fsdp", "fsdp_modules", "set_gradient_sync"]
