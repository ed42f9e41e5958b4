"""Apply the configured parallelism to a model built on the meta device, in torchtitan's order:
float8 → tensor parallel → activation checkpointing → compile → FSDP (then context parallel hooks)."""

from __future__ import annotations

from torch import nn

from herd.adapters.multimodal import MultimodalLlama
from herd.config import ParallelConfig
from herd.parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile, apply_float8
from herd.parallel.dims import Meshes, ParallelDims, ParallelLayoutError
from herd.parallel.fsdp import apply_fsdp
from herd.parallel.tensor_parallel import apply_tensor_parallel_to_all


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    mesh: Meshes | None,
    cfg: ParallelConfig,
    train_dtype: str = "fp32",
) -> nn.Module:
    if dims.cp > 1 and any(isinstance(m, MultimodalLlama) for m in model.modules()):
        # its forward takes no load-balanced positions, and images are not split along the sequence
        raise ParallelLayoutError(
            f"parallel.cp={dims.cp}: context parallelism is not supported for the image adapter "
            "(MultimodalLlama, `herd train vision`); use parallel.cp=1 with dp_shard/tp"
        )
    if cfg.float8:
        apply_float8(model)
    if dims.tp > 1:
        apply_tensor_parallel_to_all(model, mesh["tp"], cfg.sequence_parallel)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model)
    if dims.fsdp_enabled:
        fsdp_mesh = mesh.hsdp if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        param_dtype = train_dtype if cfg.param_dtype == "auto" else cfg.param_dtype
        apply_fsdp(model, fsdp_mesh, param_dtype, cfg.reduce_dtype, cfg.fsdp_reshard_after_forward)
    if dims.cp > 1:
        if cfg.cp_impl != "allgather":
            raise ValueError(f"parallel.cp_impl {cfg.cp_impl!r}: only the paper's 'allgather' is implemented")
        from herd.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"].get_group())
    return model
