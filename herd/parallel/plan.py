"""A parallel plan: how one model family is parallelised, declared beside the other families' plans.

The generic code of `herd.parallel` (FSDP, activation checkpointing, compile, TP, CP, PP) applies a plan
and never names a model class; each model family writes one plan (`herd/plans/`): which submodules are
FSDP units, activation-checkpoint units and compile units (by fully-qualified name, so the same rule
works on a whole model and on a pipeline stage of it), how tensor parallelism shards it, which modules
gather keys and values under context parallelism, and how the model is cut into pipeline stages.

Adding a modality means writing its plan; nothing in `herd.parallel` changes. The degrees a plan can
run under follow from what it declares (`supported_dims`); a task may support fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


def no_units(model: nn.Module) -> list[str]:
    return []


def no_buffers(model: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class PipelineSplit:
    """How a model is cut into pipeline stages.

    unit_sizes(model): the cost (in layers) of each *unit*, the pieces that must stay on one stage, in
        forward order (a Llama: each Transformer block, size 1; the image adapter: a cross-attention layer
        with the self-attention layers before it). Stages are contiguous runs of units.
    build_stage(model, stage_id, n_stages, unit_ids): a copy of the meta-device `model` holding only
        those units (plus the embedding on the first stage and the head on the last), whose
        `forward(x, **kwargs)` takes the model's first input (first stage) or the previous stage's output,
        and the model's keyword inputs on every stage; the last stage returns the model's output.
    replicated(stage): FQNs of modules every stage holds a full copy of (the image encoder); their
        gradients are summed over the pipeline ranks before the optimizer step.
    """

    unit_sizes: Callable[[nn.Module], list[int]]
    build_stage: Callable[[nn.Module, int, int, list[int]], nn.Module]
    replicated: Callable[[nn.Module], list[str]] = no_units


@dataclass(frozen=True)
class ParallelPlan:
    """What the generic code needs to parallelise one model family (see the module docstring).

    fsdp_units / checkpoint_units / compile_units(model): FQNs of submodules, in forward order: each FSDP
        unit is all-gathered just before it runs and resharded after; each checkpoint unit keeps only its
        input for backward (`parallel.activation_checkpoint`); each compile unit is `torch.compile`d.
    tensor_parallel(model, tp_mesh, sequence_parallel): shards the model in place; None: no TP.
    context_parallel: the model's attention can all-gather keys and values over a CP group (its modules
        with a `kv_gather` attribute, `herd.parallel.context_parallel`) and its forward takes `positions`.
    pipeline: the stage split; None: no PP.
    fsdp_forward_methods(model): (FQN, method name) of methods other than `forward` that run an FSDP unit's
        parameters (the cross-attention blocks' `image_kv`): FSDP all-gathers the unit around them too.
    init_buffers(model): recompute derived, non-persistent buffers (RoPE tables) after materialisation.
    float8_skip(fqn): linear layers that stay in high precision under `parallel.float8` (the head).
    """

    name: str
    fsdp_units: Callable[[nn.Module], list[str]] = no_units
    checkpoint_units: Callable[[nn.Module], list[str]] = no_units
    compile_units: Callable[[nn.Module], list[str]] = no_units
    tensor_parallel: Callable[..., None] | None = None
    context_parallel: bool = False
    pipeline: PipelineSplit | None = None
    fsdp_forward_methods: Callable[[nn.Module], list[tuple[str, str]]] = no_units  # type: ignore[assignment]
    init_buffers: Callable[[nn.Module], None] = no_buffers
    float8_skip: Callable[[str], bool] = field(default=lambda fqn: False)

    def supported_dims(self) -> frozenset[str]:
        """The layout dimensions this plan can apply (FSDP and HSDP always)."""
        dims = {"fsdp", "hsdp"}
        if self.tensor_parallel is not None:
            dims.add("tp")
        if self.context_parallel:
            dims.add("cp")
        if self.pipeline is not None:
            dims.add("pp")
        return frozenset(dims)


def prefixed(rule: Callable[[nn.Module], list[str]], prefix: str) -> Callable[[nn.Module], list[str]]:
    """`rule` applied to the submodule at `prefix` (absent on a pipeline stage: no units), names prefixed."""

    def units(model: nn.Module) -> list[str]:
        sub = submodule_or_none(model, prefix)
        return [] if sub is None else [f"{prefix}.{name}" for name in rule(sub)]

    return units


def submodule_or_none(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def replace_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put `new` where `fqn` is (in a ModuleDict/ModuleList or as an attribute of its parent)."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleDict | nn.ModuleList):
        parent[child if isinstance(parent, nn.ModuleDict) else int(child)] = new
    else:
        setattr(parent, child, new)


__all__ = [
    "ParallelPlan",
    "PipelineSplit",
    "no_buffers",
    "no_units",
    "prefixed",
    "replace_submodule",
    "submodule_or_none",
]
