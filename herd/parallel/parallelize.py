"""Apply a model's parallel plan to the model built on the meta device, in torchtitan's order:
float8 → tensor parallel → activation checkpointing → compile → FSDP (then context parallel hooks).

Nothing here knows a model class: what is sharded, wrapped or compiled is what the plan names
(`herd.parallel.plan.ParallelPlan`, one per model family in `herd/plans/`)."""

from __future__ import annotations

from torch import nn

from herd.config import ParallelConfig
from herd.parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile, apply_float8
from herd.parallel.dims import Meshes, ParallelDims, ParallelLayoutError
from herd.parallel.fsdp import apply_fsdp
from herd.parallel.plan import ParallelPlan


def layout_degrees(dims: ParallelDims) -> dict[str, int]:
    """{"fsdp", "hsdp", "tp", "cp", "pp"} → degree, as tasks and plans declare what they support."""
    return {"fsdp": dims.dp_shard, "hsdp": dims.dp_replicate, "tp": dims.tp, "cp": dims.cp, "pp": dims.pp}


_NAMES = {"tp": "tensor parallelism", "cp": "context parallelism", "pp": "pipeline parallelism"}


def check_plan_supports(plan: ParallelPlan, dims: ParallelDims) -> None:
    """A clear error when the layout asks for a dimension the model's plan does not declare."""
    unsupported = [d for d, n in layout_degrees(dims).items() if n > 1 and d not in plan.supported_dims()]
    if unsupported:
        raise ParallelLayoutError(
            f"{' and '.join(_NAMES[d] for d in unsupported)} is not supported for the {plan.name} "
            f"(parallel.{' / parallel.'.join(unsupported)} > 1): its parallel plan declares "
            f"{', '.join(sorted(plan.supported_dims()))}"
        )


def parallelize(
    model: nn.Module,
    plan: ParallelPlan,
    dims: ParallelDims,
    mesh: Meshes | None,
    cfg: ParallelConfig,
    train_dtype: str = "fp32",
) -> nn.Module:
    check_plan_supports(plan, dims)
    if cfg.float8:
        apply_float8(model, plan.float8_skip)
    if dims.tp > 1:
        plan.tensor_parallel(model, mesh["tp"], cfg.sequence_parallel)
    apply_activation_checkpointing(model, plan.checkpoint_units(model), cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model, plan.compile_units(model))
    if dims.fsdp_enabled:
        fsdp_mesh = mesh.hsdp if dims.dp_replicate > 1 else mesh["dp_shard_cp"]
        param_dtype = train_dtype if cfg.param_dtype == "auto" else cfg.param_dtype
        apply_fsdp(
            model, plan.fsdp_units(model), fsdp_mesh, param_dtype, cfg.reduce_dtype,
            cfg.fsdp_reshard_after_forward, plan.fsdp_forward_methods(model),
        )  # fmt: skip
    if dims.cp > 1:
        from herd.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, mesh["cp"].get_group())
    return model
