"""Megatron-style tensor parallelism (+ sequence parallelism) for `herd.text.Llama`, via DTensor.

Attention is split by heads (query *and* KV heads: GQA needs n_kv_heads % tp == 0), the SwiGLU FFN by
its hidden width: wq/wk/wv/w1/w3 column-wise, wo/w2 row-wise. With sequence parallelism the norms
and residual stream are sharded along the sequence between the blocks (Shard(1)), turning each
block's all-reduce into a reduce-scatter + all-gather pair and dividing activation memory by tp.
The model code runs unchanged: it reshapes with `view(B, T, -1, hd)`, so local heads just work.

`apply_multimodal_tensor_parallel` shards the image adapter's frozen LLM and replicates the rest (image
encoder, projector, cross-attention), `apply_tensor_parallel_to_all` handles whatever a model holds.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from herd.adapters.multimodal import MultimodalLlama
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


def apply_tensor_parallel(
    model: Llama, tp_mesh: DeviceMesh, sequence_parallel: bool = True, split_at_embedding: bool = True
) -> None:
    """Shard `model` (a whole Llama or a pipeline stage of one) over `tp_mesh` in place.

    split_at_embedding=False (sequence parallel only): the embedding's output stays whole on every rank
    and the caller splits the sequence before the first block (`apply_multimodal_tensor_parallel`)."""
    check_tp_divisibility(model, tp_mesh.size())
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    between_blocks = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        embedded = between_blocks if split_at_embedding else Replicate()
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=embedded)
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
    # torch's SequenceParallel re-registers the norm weights as new, trainable Parameters: a frozen
    # model (the image adapter's LLM) must stay frozen, or its norms would join the optimizer
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def llama_modules(model: nn.Module) -> list[Llama]:
    return [m for m in model.modules() if isinstance(m, Llama)]


def apply_multimodal_tensor_parallel(
    model: MultimodalLlama, tp_mesh: DeviceMesh, sequence_parallel: bool = True
) -> None:
    """Tensor parallelism for the image adapter (paper §7): the frozen LLM is sharded as above; the image
    encoder, projector, image-token embeddings and gated cross-attention blocks are replicated on every
    TP rank, and every trainable parameter stays a plain tensor.

    Why the cross-attention blocks are replicated, not split by heads like the LLM's attention:
    - their per-head RMSNorms (q_norm, k_norm: one (hd,) weight shared by all heads) would get only this
      rank's heads' share of the gradient: a head split needs an extra all-reduce for them;
    - the optimizer's multi-tensor AdamW cannot mix DTensor and plain parameters in one group (the
      encoder's matrices are plain), nor, under FSDP, DTensors on the 2-d (dp, tp) and 1-d dp meshes.
    The price: every TP rank runs the blocks in full (at one per four LLM layers, a fifth of the layers)
    and holds their optimizer state, which only FSDP's dp_shard divides. Splitting them needs both of
    the above: an all-reduce of the q/k-norm gradients and optimizer groups split by mesh (herd.optim).

    Gradients: every TP rank computes the loss from the same whole logits and the Runtime sums it over
    data ranks only, so nothing is counted twice; the gradient of the residual stream comes back from
    the LLM's column-sharded projections all-reduced, hence identical on every TP rank, and so are the
    replicated modules' gradients (same inputs, same weights).

    Sequence parallelism: the residual stream between LLM blocks is this rank's slice of the sequence
    (Shard(1)). The embedding's output is kept whole (the image-token embeddings overwrite some of its
    rows in `MultimodalLlama.embed`) and split before the first LLM block; each cross-attention block
    all-gathers the sequence on entry and keeps this rank's slice of its output (backward: the slices'
    gradients are all-gathered, the block's input gradient sliced). A batch is as long as its longest
    row, so the forward pads the tokens (and masks) at the end to a multiple of the TP degree and cuts
    the logits back: causal attention keeps the real positions exact, and padded rows see no image.
    """
    llm = model.llm
    if not sequence_parallel:  # the residual stream is whole everywhere: the replicas need nothing
        apply_tensor_parallel(llm, tp_mesh, sequence_parallel=False)
        return
    apply_tensor_parallel(llm, tp_mesh, sequence_parallel=True, split_at_embedding=False)
    layout = Replicate()  # of the residual stream where the forward has got to
    for key in [*llm.layers.keys(), str(llm.args.n_layers)]:  # the forward's order; n: after the last
        if key in model.cross_attention:
            # CrossAttentionBlock.forward(h, kv, mask): gather h, run whole, keep this rank's slice
            gather_then_slice = PrepareModuleInputOutput(
                input_layouts=(layout, None, None),
                desired_input_layouts=(Replicate(), None, None),
                use_local_input=True,
                output_layouts=Replicate(),
                desired_output_layouts=Shard(1),
            )
            parallelize_module(model.cross_attention[key], tp_mesh, gather_then_slice)
            layout = Shard(1)
        if key in llm.layers and layout != Shard(1):  # the first block: split the whole embedding
            split = PrepareModuleInput(
                input_layouts=(Replicate(), None, None),
                desired_input_layouts=(Shard(1), None, None),
                use_local_output=True,
            )  # TransformerBlock.forward(x, ctx, cache)
            parallelize_module(llm.layers[key], tp_mesh, split)
            layout = Shard(1)
    _pad_sequence_to_multiple(model, tp_mesh.size())


def _pad_sequence_to_multiple(model: MultimodalLlama, multiple: int) -> None:
    """Forward hooks: pad tokens, cross-attention mask and document ids at the end to a multiple of
    `multiple` positions, and cut the logits (B, T', V) back to (B, T, V)."""
    signature = inspect.signature(model.forward)
    lengths: list[int] = []

    def pad(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = signature.bind(*args, **kwargs)
        inputs = bound.arguments
        if inputs.get("kv_cache") is not None:
            raise ValueError("a MultimodalLlama under sequence parallelism runs whole sequences, no KV cache")
        tokens = inputs["tokens"]  # (B, T)
        T = tokens.shape[1]
        extra = -T % multiple
        lengths.append(T)
        if extra == 0:
            return args, kwargs
        if T + extra > model.args.max_seq_len:
            raise ValueError(
                f"a {T}-token batch padded to a multiple of tp={multiple} exceeds the LLM's max_seq_len "
                f"{model.args.max_seq_len} (sequence parallelism splits the sequence evenly)"
            )
        inputs["tokens"] = F.pad(tokens, (0, extra), value=0)
        mask = inputs.get("cross_attention_mask")  # (B, T, ...): padded rows see no image
        if mask is not None:
            inputs["cross_attention_mask"] = torch.cat(
                [mask, mask.new_zeros(mask.shape[0], extra, *mask.shape[2:])], 1
            )
        docs = inputs.get("document_ids")  # (B, T): padded positions join the last document
        if docs is not None:
            inputs["document_ids"] = torch.cat([docs, docs[:, -1:].expand(-1, extra)], 1)
        return (), dict(inputs)

    def cut(_module: nn.Module, _args: tuple, _kwargs: dict, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : lengths.pop()]  # (B, T, V)

    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(cut, with_kwargs=True)


def apply_tensor_parallel_to_all(
    model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True
) -> None:
    """Every MultimodalLlama found in `model` (with its LLM), then every other Llama."""
    composed = [m for m in model.modules() if isinstance(m, MultimodalLlama)]
    for m in composed:
        apply_multimodal_tensor_parallel(m, tp_mesh, sequence_parallel)
    inner = {id(m.llm) for m in composed}
    for llama in llama_modules(model):
        if id(llama) not in inner:
            apply_tensor_parallel(llama, tp_mesh, sequence_parallel)
