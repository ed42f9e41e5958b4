"""The parallel plan of the image adapter (`herd.adapters.MultimodalLlama`: frozen Llama + image encoder +
projector + gated cross-attention layers), paper §7.

- FSDP / activation-checkpoint / compile units: the image encoder's blocks (local and gated global
  transformer), the cross-attention blocks and the LLM's Transformer blocks.
- Tensor parallelism: the frozen LLM is sharded as the Llama plan shards it; the encoder, projector,
  image-token embeddings and cross-attention blocks are replicated on every TP rank (see
  `apply_multimodal_tensor_parallel` for why).
- Pipeline (paper §7.2.4, "stages of 4 self-attention + 1 cross-attention layer"): a unit is a
  cross-attention layer together with the self-attention layers that run before it since the previous
  one, so a stage boundary always follows a cross-attention layer. The image encoder and projector are
  replicated on every stage (their gradients are summed over the pipeline); a stage without a
  cross-attention layer does not run them. The image-token embeddings live on the first stage, the
  final norm and head on the last.
- No context parallelism: images are not split along the sequence.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleInputOutput, parallelize_module

from herd.adapters.multimodal import MultimodalLlama
from herd.parallel.plan import ParallelPlan, PipelineSplit
from herd.plans.llama import apply_tensor_parallel, init_rope_everywhere


def encoder_blocks(model: nn.Module) -> list[str]:
    """The image encoder's blocks (local transformer, then the gated global layers)."""
    vision = getattr(model, "vision", None)
    if vision is None:
        return []
    return [f"vision.transformer.{i}" for i in range(len(vision.transformer))] + [
        f"vision.global_transformer.{i}" for i in range(len(vision.global_transformer))
    ]


def video_blocks(model: nn.Module) -> dict[str, str]:
    """key → FQN of the video cross-attention blocks (`herd.adapters.video`), none without video."""
    video = getattr(model, "video", None)
    if video is None:
        return {}
    return {key: f"video.cross_attention.{key}" for key in video.cross_attention}


def decoder_items(model: nn.Module) -> list[tuple[str, str]]:
    """("vxattn" | "xattn" | "layer", key) in forward order: at key k the video cross-attention block,
    then the image one, then LLM layer k."""
    keys = sorted(
        [(int(k), 0, "vxattn", k) for k in video_blocks(model)]
        + [(int(k), 1, "xattn", k) for k in model.cross_attention]  # type: ignore[union-attr]
        + [(int(k), 2, "layer", k) for k in model.llm.layers]  # type: ignore[union-attr]
    )
    return [(kind, key) for _, _, kind, key in keys]


UNIT_PREFIX = {"vxattn": "video.cross_attention", "xattn": "cross_attention", "layer": "llm.layers"}


def blocks(model: nn.Module) -> list[str]:
    """Every unit, in forward order: encoder blocks, the video resampler (with video), then the LLM's,
    the image and the video cross-attention blocks."""
    out = encoder_blocks(model)
    if getattr(model, "video", None) is not None:
        out.append("video.resampler")
    for kind, key in decoder_items(model):
        out.append(f"{UNIT_PREFIX[kind]}.{key}")
    return out


# --- pipeline ---------------------------------------------------------------------------------------------
def pipeline_units(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Units: the decoder items up to and including each cross-attention layer; the rest is the last unit."""
    units: list[list[tuple[str, str]]] = [[]]
    for item in decoder_items(model):
        units[-1].append(item)
        if item[0] == "xattn":
            units.append([])
    return [u for u in units if u]


class MultimodalStage(MultimodalLlama):
    """A `MultimodalLlama` holding one pipeline stage's LLM layers and cross-attention layers (and a copy
    of the encoder); `forward(x, **images)`: x is token ids on the first stage, hidden states elsewhere."""

    stage_id: int

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,  # (B, T) ids on the first stage, (B, T, D) elsewhere
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.image_token_embeddings is not None:  # the first stage
            h, T = self.embed(x), x.shape[1]
        else:
            h, T = x, x.shape[1]
            if torch.is_grad_enabled() and h.is_leaf and not h.requires_grad:
                h.requires_grad_(True)  # a received activation: the gradient must flow back
        img = None
        if len(self.cross_attention):  # only stages with cross-attention layers run the encoder
            images = {"pixel_values": pixel_values, "aspect_ratio_ids": aspect_ratio_ids,
                      "aspect_ratio_mask": aspect_ratio_mask, "image_features": image_features}  # fmt: skip
            img = self._image_context(T, 0, None, cross_attention_mask, images)
        ctx = self.llm.attention_context(T, 0, document_ids, None, h.device)
        for kind, key in decoder_items(self):
            if kind == "layer":
                h = self.llm.layers[key](h, ctx)
            elif img is not None:
                h = self.cross_attention[key](h, img.kv[key], img.mask)
        if self.llm.output is None and self.llm.norm is None:
            return h  # not the last stage
        return self.llm.head(h)  # (B, T, V)


def build_multimodal_stage(model: nn.Module, stage_id: int, n_stages: int, unit_ids: list[int]) -> nn.Module:
    if not isinstance(model, MultimodalLlama):
        raise TypeError(
            f"the image adapter's stages are cut from a MultimodalLlama, got {type(model).__name__}"
        )
    if model.llm.args.tie_embeddings and n_stages > 1:
        raise ValueError(
            "tie_embeddings is not supported with pipeline parallelism (the head needs the embedding)"
        )
    if getattr(model, "video", None) is not None:
        raise ValueError(
            "pipeline parallelism is not supported for a model with a video adapter (herd train video runs "
            "FSDP/HSDP and TP)"
        )
    units = pipeline_units(model)
    mine = [item for u in unit_ids for item in units[u]]
    layers = {key for kind, key in mine if kind == "layer"}
    xattn = {key for kind, key in mine if kind == "xattn"}
    first, last = stage_id == 0, stage_id == n_stages - 1
    stage = copy.deepcopy(model)
    for key in list(stage.llm.layers.keys()):
        if key not in layers:
            del stage.llm.layers[key]
    for key in list(stage.cross_attention.keys()):
        if key not in xattn:
            del stage.cross_attention[key]
    if not first:
        stage.llm.tok_embeddings = None
        stage.image_token_embeddings = None
    if not last:
        stage.llm.norm = None
        stage.llm.output = None
    stage.__class__ = MultimodalStage
    stage.stage_id = stage_id
    return stage


def replicated_on_every_stage(stage: nn.Module) -> list[str]:
    return [name for name in ("vision", "projector") if getattr(stage, name, None) is not None]


# --- tensor parallelism -----------------------------------------------------------------------------------
def apply_multimodal_tensor_parallel(
    model: MultimodalLlama, tp_mesh: DeviceMesh, sequence_parallel: bool = True
) -> None:
    """Tensor parallelism for the image adapter (paper §7): the frozen LLM is sharded as the Llama plan
    shards it; the image encoder, projector, image-token embeddings and gated cross-attention blocks are
    replicated on every TP rank, and every trainable parameter stays a plain tensor.

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
    video = model.video.cross_attention if model.video is not None else {}
    for key in [*llm.layers.keys(), str(llm.args.n_layers)]:  # the forward's order; n: after the last
        for xattn in (video, model.cross_attention):  # at one key the video block runs first
            if key not in xattn:
                continue
            # CrossAttentionBlock.forward(h, kv, mask): gather h, run whole, keep this rank's slice
            gather_then_slice = PrepareModuleInputOutput(
                input_layouts=(layout, None, None),
                desired_input_layouts=(Replicate(), None, None),
                use_local_input=True,
                output_layouts=Replicate(),
                desired_output_layouts=Shard(1),
            )
            parallelize_module(xattn[key], tp_mesh, gather_then_slice)
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
        for name in ("cross_attention_mask", "video_cross_attention_mask"):  # (B, T, ...): padded rows
            mask = inputs.get(name)  # see no image and no video
            if mask is not None:
                inputs[name] = torch.cat([mask, mask.new_zeros(mask.shape[0], extra, *mask.shape[2:])], 1)
        docs = inputs.get("document_ids")  # (B, T): padded positions join the last document
        if docs is not None:
            inputs["document_ids"] = torch.cat([docs, docs[:, -1:].expand(-1, extra)], 1)
        return (), dict(inputs)

    def cut(_module: nn.Module, _args: tuple, _kwargs: dict, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, : lengths.pop()]  # (B, T, V)

    model.register_forward_pre_hook(pad, with_kwargs=True)
    model.register_forward_hook(cut, with_kwargs=True)


def _tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    if not isinstance(model, MultimodalLlama) or isinstance(model, MultimodalStage):
        raise ValueError(
            "the image adapter runs tensor parallelism on the whole model, not on pipeline stages"
        )
    apply_multimodal_tensor_parallel(model, tp_mesh, sequence_parallel)


def image_kv_methods(model: nn.Module) -> list[tuple[str, str]]:
    """The cross-attention blocks compute their image keys/values in `image_kv`, outside `forward`."""
    image = [(f"cross_attention.{key}", "image_kv") for key in model.cross_attention]  # type: ignore[union-attr]
    return image + [(fqn, "image_kv") for fqn in video_blocks(model).values()]


MULTIMODAL_PLAN = ParallelPlan(
    name="image adapter (MultimodalLlama)",
    fsdp_units=blocks,
    checkpoint_units=blocks,
    compile_units=blocks,
    tensor_parallel=_tensor_parallel,
    context_parallel=False,
    pipeline=PipelineSplit(
        unit_sizes=lambda model: [len(u) for u in pipeline_units(model)],
        build_stage=build_multimodal_stage,
        replicated=replicated_on_every_stage,
    ),
    fsdp_forward_methods=image_kv_methods,
    init_buffers=init_rope_everywhere,
)

__all__ = [
    "MULTIMODAL_PLAN",
    "MultimodalStage",
    "apply_multimodal_tensor_parallel",
    "blocks",
    "build_multimodal_stage",
    "encoder_blocks",
    "pipeline_units",
]
