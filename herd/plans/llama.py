"""The parallel plan of the Llama family (`herd.text.Llama`, every preset).

- FSDP / activation-checkpoint / compile units: the Transformer blocks (`layers.N`).
- Tensor parallelism: Megatron-style, via DTensor. Attention is split by heads (query *and* KV heads:
  GQA needs n_kv_heads % tp == 0), the SwiGLU FFN by its hidden width: wq/wk/wv/w1/w3 column-wise, wo/w2
  row-wise. With sequence parallelism the norms and residual stream are sharded along the sequence
  between the blocks (Shard(1)), turning each block's all-reduce into a reduce-scatter + all-gather
  pair and dividing activation memory by tp. The model code runs unchanged: it reshapes with
  `view(B, T, -1, hd)`, so local heads just work.
- Context parallelism: the Llama's `kv_gather` (keys and values all-gathered, paper §3.3.2).
- Pipeline: units are the blocks; a stage (`LlamaStage`) is a `Llama` with the other layers deleted from
  its `ModuleDict`, so FQNs stay the checkpoint's; the embedding lives on the first stage, the final
  norm and head on the last. Tied embeddings (Llama 3.2 1B/3B) are refused: the last stage would need
  a second copy of the embedding matrix with its gradient all-reduced against stage 0's; those models
  never need PP.
"""

from __future__ import annotations

import copy

import torch
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

from herd.parallel.plan import ParallelPlan, PipelineSplit
from herd.text.model import Llama


def llama_blocks(model: nn.Module) -> list[str]:
    """FQNs of a Llama's (or a stage's) Transformer blocks, in forward order."""
    return [f"layers.{key}" for key in model.layers]  # type: ignore[union-attr]


# --- tensor parallelism ----------------------------------------------------------------------------------
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
    and the caller splits the sequence before the first block (the image adapter's plan)."""
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


# --- pipeline stages --------------------------------------------------------------------------------------
def stage_positions(positions: torch.Tensor | None) -> torch.Tensor | None:
    """Context parallelism's positions (T,), which the pipeline hands every stage expanded to (B, T)."""
    return positions[0] if positions is not None and positions.dim() == 2 else positions


class LlamaStage(Llama):
    """A `Llama` holding only some layers; `forward(x, document_ids)` runs this stage's share.

    x is the token ids (B, T) on the first stage, the previous stage's hidden states (B, T, D)
    elsewhere; returns hidden states, or logits (B, T, V) on the last stage.
    """

    stage_id: int  # set by build_stage_module

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        document_ids: torch.Tensor | None = None,  # (B, T) int
        positions: torch.Tensor | None = None,  # (T,) or (B, T) rows equal: context parallelism's
    ) -> torch.Tensor:
        h = self.stage_hidden(x, document_ids, stage_positions(positions))
        if self.output is None:  # not the last stage (tied embeddings are refused, see the module doc)
            return h
        return self.output(self.norm(h))

    def stage_hidden(
        self, x: torch.Tensor, document_ids: torch.Tensor | None, pos: torch.Tensor | None
    ) -> torch.Tensor:
        """This stage's layers on x: embedded tokens on the first stage, received activations elsewhere."""
        if self.tok_embeddings is not None:
            h = self.embed(x)
        else:
            h = x
            # The received buffer must be an autograd leaf that requires grad, or no gradient goes back
            # to the previous stage. torch marks it only if the first run of this shape had a backward.
            if torch.is_grad_enabled() and h.is_leaf and not h.requires_grad:
                h.requires_grad_(True)
        # The length comes from the inputs, not from h: under sequence parallelism the activations
        # are split along the sequence (as in Llama.forward_hidden).
        if self.tok_embeddings is not None:
            length = x.shape[1]
        elif document_ids is not None:
            length = document_ids.shape[1]
        else:
            length = pos.shape[0] if pos is not None else h.shape[1]
        ctx = self.attention_context(length, 0, document_ids, pos, h.device)
        for layer in self.layers.values():
            h = layer(h, ctx)
        return h

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        # Llama.init_weights picks the embedding std from `self.output` (1.0 untied, 0.02 tied); stage 0
        # has no output projection, so it would take the tied model's std.
        if self.tok_embeddings is not None and not self.args.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=1.0)


def build_stage_module(
    model: Llama, stage_id: int, n_stages: int, layer_split: list[list[int]]
) -> LlamaStage:
    """A copy of `model` (build it on the meta device: nothing is allocated) keeping only stage
    `stage_id`'s layers, the embedding on stage 0 and the final norm + output on the last stage."""
    if not isinstance(model, Llama):
        raise TypeError(f"pipeline stages are cut from a herd.text.Llama, got {type(model).__name__}")
    if model.args.tie_embeddings and n_stages > 1:
        raise ValueError(
            "tie_embeddings (Llama 3.2 1B/3B) is not supported with pipeline parallelism: the last stage "
            "would need the embedding matrix too. These models fit without PP; use FSDP/TP instead"
        )
    if len(layer_split) != n_stages or not 0 <= stage_id < n_stages:
        raise ValueError(
            f"stage {stage_id} of {n_stages} does not fit a split into {len(layer_split)} stages"
        )
    return cut_llama(
        model, layer_split[stage_id], stage_id == 0, stage_id == n_stages - 1, LlamaStage, stage_id
    )


def cut_llama(
    model: Llama, layers: list[int], first: bool, last: bool, cls: type = LlamaStage, stage_id: int = 0
) -> Llama:
    """A deep copy of (meta-device) `model` keeping `layers`, the embedding if `first`, the final norm and
    head if `last`, re-classed as `cls` (a Llama subclass with a stage forward)."""
    keep = {str(i) for i in layers}
    stage = copy.deepcopy(model)
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]  # the remaining keys keep their global ids: checkpoint FQNs
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    stage.__class__ = cls  # same state, stage forward; still an instance of Llama
    stage.stage_id = stage_id
    return stage


def _llama_stage(model: nn.Module, stage_id: int, n_stages: int, units: list[int]) -> nn.Module:
    split = [[] for _ in range(n_stages)]
    split[stage_id] = units
    return build_stage_module(model, stage_id, n_stages, split)  # type: ignore[arg-type]


def init_rope_everywhere(model: nn.Module) -> None:
    """(Re)compute the RoPE tables of every Llama inside `model` after materialisation."""
    for m in model.modules():
        if isinstance(m, Llama):
            m.init_rope()


LLAMA_PLAN = ParallelPlan(
    name="Llama",
    fsdp_units=llama_blocks,
    checkpoint_units=llama_blocks,
    compile_units=llama_blocks,
    tensor_parallel=apply_tensor_parallel,
    context_parallel=True,
    pipeline=PipelineSplit(
        unit_sizes=lambda model: [1] * len(model.layers),  # type: ignore[arg-type]
        build_stage=_llama_stage,
    ),
    init_buffers=init_rope_everywhere,
    float8_skip=lambda fqn: fqn == "output" or fqn.endswith(".output"),
)

__all__ = [
    "LLAMA_PLAN",
    "LlamaStage",
    "apply_tensor_parallel",
    "build_stage_module",
    "check_tp_divisibility",
    "cut_llama",
    "init_rope_everywhere",
    "llama_blocks",
    "stage_positions",
]
