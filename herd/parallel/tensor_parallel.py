"""Megatron-style tensor parallelism (+ sequence parallelism) for `herd.text.Llama`, via DTensor.

Attention is split by heads (query *and* KV heads: GQA needs n_kv_heads % tp == 0), the SwiGLU FFN by
its hidden width: wq/wk/wv/w1/w3 column-wise, wo/w2 row-wise. With sequence parallelism the norms
and residual stream are sharded along the sequence between the blocks (Shard(1)), turning each
block's all-reduce into a reduce-scatter + all-gather pair and dividing activation memory by tp.
The model code runs unchanged: it reshapes with `view(B, T, -1, hd)`, so local heads just work.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from herd.text.model import Llama


def check_tp_divisibility(model: Llama, tp: int) -> None:
    a = model.args
    problems = [
        f"{name} {value} % tp {tp} != 0"
        for name, value in (
            ("n_heads", a.n_heads),
            ("n_kv_heads", a.n_kv_heads),
            ("ffn_hidden_dim", a.ffn_hidden_dim),
        )
        if value % tp
    ]
    if problems:
        raise ValueError(f"tensor parallel degree {tp} does not divide the model: {'; '.join(problems)}")
    if a.tie_embeddings:
        raise ValueError(
            "tie_embeddings with tp > 1 is not supported (the vocab-sharded embedding cannot double as the "
            "column-sharded head); Llama 3.2 1B/3B are small enough for FSDP alone"
        )


def apply_tensor_parallel(model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Shard `model` (a whole Llama or a pipeline stage of one) over `tp_mesh` in place."""
    check_tp_divisibility(model, tp_mesh.size())
    between_blocks = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        # full logits on every TP rank: the loss is the same code as on one device
        top["output"] = ColwiseParallel(input_layouts=between_blocks, output_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan: dict[str, object] = {
            # Attention.forward(x, ctx, cache): only x is a tensor to redistribute
            "attention": PrepareModuleInput(
                input_layouts=(between_blocks, None, None),
                desired_input_layouts=(Replicate(), None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between_blocks),
            "feed_forward": PrepareModuleInput(
                input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=between_blocks),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)


def llama_modules(model: nn.Module) -> list[Llama]:
    return [m for m in model.modules() if isinstance(m, Llama)]
