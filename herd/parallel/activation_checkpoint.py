"""Activation checkpointing (full / selective), per-block torch.compile, float8 linears.

- full: a block keeps only its input; everything inside is recomputed in backward.
- selective: keep the outputs of the expensive ops (matmuls, attention) and recompute the cheap
  element-wise ones (norms, SiLU, RoPE, residual adds) — most of the memory saving for ~no extra FLOPs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from herd.text.model import Llama

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


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap each Transformer block of every Llama inside `model`; FQNs gain a wrapper prefix that
    torch.distributed.checkpoint's state-dict helpers strip."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpoint must be none, full or selective, got {mode!r}")
    for llama in (m for m in model.modules() if isinstance(m, Llama)):
        for name, block in list(llama.layers.items()):
            if mode == "full":
                wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            else:
                context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                wrapped = checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
            llama.layers[name] = wrapped


def apply_compile(model: nn.Module) -> None:
    """torch.compile every Transformer block in place (`Module.compile` keeps parameter names)."""
    for llama in (m for m in model.modules() if isinstance(m, Llama)):
        for block in llama.layers.values():
            block.compile(fullgraph=False)


def apply_float8(model: nn.Module) -> None:
    """Swap linear layers for torchao's float8 training linears (row-wise scaled), Hopper GPUs only.

    The output head stays in bf16 (paper §6: first and last layers are not quantised)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("parallel.float8 needs an NVIDIA GPU with compute capability >= 8.9 (H100/H200)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("parallel.float8 needs torchao: pip install torchao") from e
    config = Float8LinearConfig.from_recipe_name("rowwise")
    convert_to_float8_training(
        model,
        config=config,
        module_filter_fn=lambda mod, fqn: fqn != "output" and not fqn.endswith(".output"),
    )
