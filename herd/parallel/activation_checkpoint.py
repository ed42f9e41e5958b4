"""Activation checkpointing (full / selective), per-unit torch.compile, float8 linears: applied to the
units a model's parallel plan names (`herd.parallel.plan`).

- full: a unit keeps only its input; everything inside is recomputed in backward.
- selective: keep the outputs of the expensive ops (matmuls, attention) and recompute the cheap
  element-wise ones (norms, SiLU, RoPE, residual adds) — most of the memory saving for ~no extra FLOPs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from herd.parallel.plan import replace_submodule

AC_MODES = ("none", "full", "selective")

# ops whose outputs selective AC keeps (the rest are recomputed)
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, units: list[str], mode: str) -> None:
    """Wrap each unit (an FQN of `model`) in place; FQNs gain a wrapper prefix that
    torch.distributed.checkpoint's state-dict helpers strip."""
    if mode not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpoint must be none, full or selective, got {mode!r}")
    if mode == "none":
        return
    for fqn in units:
        block = model.get_submodule(fqn)
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            wrapped = checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
        replace_submodule(model, fqn, wrapped)


def apply_compile(model: nn.Module, units: list[str]) -> None:
    """torch.compile every unit in place (`Module.compile` keeps parameter names)."""
    for fqn in units:
        model.get_submodule(fqn).compile(fullgraph=False)


def apply_float8(model: nn.Module, skip: Callable[[str], bool] = lambda fqn: False) -> None:
    """Swap linear layers for torchao's float8 training linears (row-wise scaled), Hopper GPUs only.

    Layers the plan's `float8_skip` names stay in high precision (paper §6: the output head)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("parallel.float8 needs an NVIDIA GPU with compute capability >= 8.9 (H100/H200)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("parallel.float8 needs torchao: pip install torchao") from e
    config = Float8LinearConfig.from_recipe_name("rowwise")
    convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, fqn: not skip(fqn))
