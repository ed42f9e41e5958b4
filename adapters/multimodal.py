"""The composed image model (paper §7.2): a frozen `herd.text.Llama`, an image encoder, a projector and
gated cross-attention layers interleaved with the LLM's self-attention layers.

    tokens (B, T) ──embed──▶ h ─▶ [xattn_i]? ─▶ llm layer i ─▶ … ─▶ norm/head ─▶ logits (B, T, V)
    pixels (B, M, T_tiles, 3, S, S) ─▶ VisionEncoder ─▶ (B, M, T_tiles, N, 7680) ─▶ projector
                                      ─▶ image tokens (B, M·T_tiles·N, D) ─▶ K/V of every xattn layer

Placement: `cross_attention_layers` lists LLM layer indices i; a cross-attention layer runs *before*
self-attention layer i (i = n_layers: after the last one). The default, `fusion_schedule(n, 4)`, is
Meta's (Llama 3.2 Vision): one cross-attention layer per 4 self-attention layers, before layers
3, 7, …, 31 of a 32-layer LLM. Hugging Face's single-list layout converts with
`herd.adapters.hf_mllama.schedule_from_hf`.

The LLM never trains (`freeze_llm`, `trainable_parameters`). Gates start at zero, so at initialisation
the logits are exactly the LLM's, with or without images; a batch without images skips the
cross-attention layers. Token ids ≥ vocab_size (`<|image|>` = 128256 and 7 spares) take trainable
embeddings (`image_token_embeddings`), the LLM's embedding stays frozen.

Decoding: image K/V are computed once per sequence and kept in a `MultimodalKVCache` with the
per-position cross-attention mask. `herd.text.generate` works unchanged after `bind_images(...)`, or
use `generate_with_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from herd.adapters.cross_attention import CrossAttentionBlock, CrossAttentionMask, build_cross_attention_mask
from herd.text.generation import Completion, SamplingParams, generate
from herd.text.kv_cache import KVCache
from herd.text.model import Llama

if TYPE_CHECKING:
    from herd.vision.encoder import VisionEncoder


def fusion_schedule(n_layers: int, every: int = 4) -> list[int]:
    """Meta's placement: cross-attention before self-attention layers n−1, n−1−every, … (ascending)."""
    if every < 1:
        raise ValueError(f"cross_attention_every must be ≥ 1, not {every}")
    return list(range(n_layers))[::-1][::every][::-1]


class MultimodalKVCache(KVCache):
    """The LLM's self-attention cache plus the bound images: per cross-attention layer K/V
    (B, K, N, hd) and the per-position cross-attention mask (B, S_max, N)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.token_mask: torch.Tensor | None = None  # bool (B, S_max, N)

    def store_mask(self, start_pos: int, rows: torch.Tensor) -> None:
        """Write mask rows (B, T, N) at start_pos; later positions repeat the last row (as in decoding)."""
        B, T, N = rows.shape
        if self.token_mask is None or self.token_mask.shape[-1] != N:
            self.token_mask = torch.ones(B, self.max_seq_len, N, dtype=torch.bool, device=rows.device)
        self.token_mask[:, start_pos : start_pos + T] = rows.bool()
        self.token_mask[:, start_pos + T :] = rows[:, -1:].bool()

    def expand_rows(self, repeats: int, length: int) -> MultimodalKVCache:
        base = super().expand_rows(repeats, length)
        out = MultimodalKVCache.__new__(MultimodalKVCache)
        out.__dict__.update(base.__dict__)
        out.image_kv = {
            k: (a.repeat_interleave(repeats, 0), b.repeat_interleave(repeats, 0))
            for k, (a, b) in self.image_kv.items()
        }
        out.token_mask = None if self.token_mask is None else self.token_mask.repeat_interleave(repeats, 0)
        return out


@dataclass
class _Images:
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per cross-attention layer, (B, K, N, hd) each
    mask: CrossAttentionMask


class MultimodalLlama(nn.Module):
    """Frozen Llama + image encoder + projector + gated cross-attention; `forward` returns logits."""

    def __init__(
        self,
        llm: Llama,
        vision: VisionEncoder | None = None,
        cross_attention_every: int = 4,
        cross_attention_layers: Sequence[int] | None = None,
        vision_dim: int | None = None,  # feature width when `vision` is None (features fed precomputed)
        num_image_token_embeddings: int = 8,  # ids vocab_size … vocab_size+7 (`<|image|>` is the first)
        mask_attention_rows: bool = True,  # False: transformers' Mllama (no row mask on attention)
        freeze_llm: bool = True,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.args = llm.args  # generation reads max_seq_len from here
        n = llm.args.n_layers
        if cross_attention_layers is None:
            layers = fusion_schedule(n, cross_attention_every)
        else:
            layers = sorted({int(i) for i in cross_attention_layers})
        if any(not 0 <= i <= n for i in layers):
            raise ValueError(f"cross_attention_layers {layers} must lie in 0..{n} (the LLM has {n} layers)")
        self.cross_attention_layers = tuple(layers)
        if vision is not None:
            if vision_dim not in (None, vision.output_dim):
                raise ValueError(f"vision_dim {vision_dim} != the encoder's output_dim {vision.output_dim}")
            vision_dim = vision.output_dim
        if vision_dim is None:
            raise ValueError("without a vision encoder, give vision_dim (the width of the image features)")
        self.vision_dim = vision_dim
        ref = next(llm.parameters())
        self.cross_attention = nn.ModuleDict(
            {str(i): CrossAttentionBlock(llm.args, mask_attention_rows) for i in layers}
        )
        self.projector = nn.Linear(vision_dim, llm.args.dim, bias=True)
        self.image_token_embeddings = nn.Embedding(num_image_token_embeddings, llm.args.dim)
        for block in self.cross_attention.values():
            block.init_weights()
        nn.init.normal_(self.image_token_embeddings.weight, std=0.02)
        for module in (self.cross_attention, self.projector, self.image_token_embeddings):
            module.to(device=ref.device, dtype=ref.dtype)
        self._bound: dict[str, Any] | None = None
        if freeze_llm:
            self.freeze_llm()

    # --- training helpers ---------------------------------------------------------------------------
    def freeze_llm(self) -> None:
        """The LLM's parameters never change (paper §7): no gradients, so no optimizer state either."""
        self.llm.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: encoder, projector, cross-attention layers, image-token embeddings."""
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen LLM (what an image-adapter checkpoint needs to hold)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    # --- pieces -------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) → (B, T, D); ids ≥ vocab_size use the trainable image-token embeddings."""
        V = self.args.vocab_size
        extra = tokens >= V
        if not bool(extra.any()):
            return self.llm.embed(tokens)
        if bool((tokens >= V + self.image_token_embeddings.num_embeddings).any()):
            raise ValueError(
                f"token id ≥ {V + self.image_token_embeddings.num_embeddings} (vocab + image tokens)"
            )
        h = self.llm.embed(tokens.masked_fill(extra, 0))
        e = self.image_token_embeddings((tokens - V).clamp(min=0)).to(h.dtype)
        return torch.where(extra[..., None], e, h)

    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,  # (B, M, T, C, S, S)
        aspect_ratio_ids: torch.Tensor | None = None,  # (B, M)
        aspect_ratio_mask: torch.Tensor | None = None,  # (B, M, T)
        image_features: torch.Tensor | None = None,  # (B, M, T, N, Dv) precomputed encoder output
    ) -> torch.Tensor:
        """The vision-only path: projected image tokens (B, M·T·N, D) that cross-attention reads."""
        if image_features is None:
            if self.vision is None:
                raise ValueError("this model has no vision encoder: pass image_features (B, M, T, N, Dv)")
            if pixel_values is None or aspect_ratio_ids is None:
                raise ValueError("pixel_values needs aspect_ratio_ids (B, M)")
            image_features = self.vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        w = self.projector.weight
        x = self.projector(image_features.to(w.device, w.dtype))  # (B, M, T, N, D)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def _tokens_per_tile(self, image_features: torch.Tensor | None) -> int:
        if image_features is not None:
            return image_features.shape[3]
        assert self.vision is not None
        return self.vision.num_patches

    def _image_context(
        self,
        length: int,
        start_pos: int,
        kv_cache: KVCache | None,
        cross_attention_mask: torch.Tensor | None,
        images: dict[str, Any],
    ) -> _Images | None:
        cache = kv_cache if isinstance(kv_cache, MultimodalKVCache) else None
        if images.get("pixel_values") is not None or images.get("image_features") is not None:
            if kv_cache is not None and cache is None:
                raise ValueError("images with a KV cache need the model's own cache: use model.new_kv_cache")
            tokens = self.encode_images(**images)  # (B, N, D)
            kv = {key: block.image_kv(tokens) for key, block in self.cross_attention.items()}
            if cache is not None:
                cache.image_kv, cache.token_mask = kv, None
        elif cache is not None and cache.image_kv:
            kv = cache.image_kv
        else:
            return None  # text only: the cross-attention layers are skipped
        token_mask = None
        if cross_attention_mask is not None:
            token_mask = cross_attention_mask.bool()
            if token_mask.dim() == 4:  # (B, T, M, tiles) → (B, T, M·tiles·N)
                per_tile = self._tokens_per_tile(images.get("image_features"))
                token_mask = token_mask.repeat_interleave(per_tile, dim=3).flatten(2)
            if token_mask.shape[1] == start_pos + length and start_pos > 0:
                token_mask = token_mask[:, start_pos:]  # a mask of the whole sequence so far
            if token_mask.shape[1] != length:
                raise ValueError(f"cross_attention_mask has {token_mask.shape[1]} rows for {length} tokens")
            if cache is not None:
                cache.store_mask(start_pos, token_mask)
        elif cache is not None and cache.token_mask is not None:
            token_mask = cache.token_mask[:, start_pos : start_pos + length]
        return _Images(kv, build_cross_attention_mask(token_mask))

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int
        pixel_values: torch.Tensor | None = None,  # (B, M, T_tiles, C, S, S)
        aspect_ratio_ids: torch.Tensor | None = None,  # (B, M)
        aspect_ratio_mask: torch.Tensor | None = None,  # (B, M, T_tiles)
        cross_attention_mask: torch.Tensor | None = None,  # (B, T, M, T_tiles) or per token (B, T, N)
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        image_features: torch.Tensor | None = None,  # (B, M, T_tiles, N, Dv) instead of pixel_values
        document_ids: torch.Tensor | None = None,  # (B, T), packed-sequence document mask
    ) -> torch.Tensor:
        T = tokens.shape[1]
        h = self.embed(tokens)  # (B, T, D)
        images = {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "image_features": image_features,
        }
        img = self._image_context(T, start_pos, kv_cache, cross_attention_mask, images)
        ctx = self.llm.attention_context(T, start_pos, document_ids, None, h.device)
        for key, layer in self.llm.layers.items():
            if img is not None and key in self.cross_attention:
                h = self.cross_attention[key](h, img.kv[key], img.mask)
            h = layer(h, ctx, kv_cache)
        last = str(self.args.n_layers)
        if img is not None and last in self.cross_attention:
            h = self.cross_attention[last](h, img.kv[last], img.mask)
        return self.llm.head(h)  # (B, T, V)

    # --- decoding -----------------------------------------------------------------------------------
    def bind_images(
        self,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,  # (B, T_prompt, M, T_tiles), per position
        image_features: torch.Tensor | None = None,
    ) -> None:
        """Images for the next `new_kv_cache`: it encodes them once and holds their K/V and mask."""
        self._bound = {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "image_features": image_features,
            "cross_attention_mask": cross_attention_mask,
        }

    def clear_images(self) -> None:
        self._bound = None

    def new_kv_cache(
        self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None
    ) -> MultimodalKVCache:
        cache = self.llm.new_kv_cache(batch_size, max_seq_len, dtype, cache_cls=MultimodalKVCache)
        if self._bound is not None:
            images = dict(self._bound)
            mask = images.pop("cross_attention_mask")
            first = images["pixel_values"] if images["pixel_values"] is not None else images["image_features"]
            if first is None or first.shape[0] != batch_size:
                raise ValueError(f"bound images do not match the batch of {batch_size} rows")
            tokens = self.encode_images(**images)
            cache.image_kv = {key: block.image_kv(tokens) for key, block in self.cross_attention.items()}
            if mask is not None:
                mask = mask.bool()
                if mask.dim() == 4:
                    mask = mask.repeat_interleave(
                        self._tokens_per_tile(images["image_features"]), dim=3
                    ).flatten(2)
                cache.store_mask(0, mask[:, : cache.max_seq_len])
        return cache


def cross_attention_mask_from_tokens(
    tokens: torch.Tensor | Sequence[Sequence[int]],  # (B, T) ids with `<|image|>` tokens in place
    num_tiles: torch.Tensor | Sequence[Sequence[int]],  # (B, M) real tiles of each image (0: none)
    image_token_id: int,
    max_num_tiles: int,
) -> torch.Tensor:
    """Mllama's per-token mask (B, T, M, max_num_tiles): image k is seen from its `<|image|>` token up to
    the next image token (the last image: to the end); consecutive image tokens all see to the end of
    the text that follows them. Only the image's real tiles are marked."""
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(r) for r in tokens]
    tiles = num_tiles.tolist() if isinstance(num_tiles, torch.Tensor) else [list(r) for r in num_tiles]
    T, M = max(len(r) for r in rows), max(len(t) for t in tiles)
    mask = torch.zeros(len(rows), T, M, max_num_tiles, dtype=torch.long)
    for b, row in enumerate(rows):
        locs = [i for i, t in enumerate(row) if t == image_token_id]
        if not locs:
            continue
        spans = [[a, z] for a, z in zip(locs[:-1], locs[1:])] + [[locs[-1], len(row)]]
        end = spans[-1][1]
        for span in reversed(spans):  # a run of adjacent image tokens shares the run's text
            if span[0] == span[1] - 1:
                span[1] = end
            end = span[1]
        for k, (start, stop) in enumerate(spans[: len(tiles[b])]):
            mask[b, start:stop, k, : int(tiles[b][k])] = 1
    return mask


def generate_with_images(
    model: MultimodalLlama,
    prompts: Sequence[Sequence[int]],
    pixel_values: torch.Tensor | None = None,  # (B, M, T_tiles, C, S, S)
    aspect_ratio_ids: torch.Tensor | None = None,  # (B, M)
    aspect_ratio_mask: torch.Tensor | None = None,  # (B, M, T_tiles)
    cross_attention_mask: torch.Tensor | None = None,  # (B, max prompt length, M, T_tiles)
    params: SamplingParams | None = None,
    stop_ids: Sequence[int] | frozenset[int] = (),
    pad_id: int = 0,
    image_features: torch.Tensor | None = None,
) -> list[Completion]:
    """`herd.text.generate` with images: every generated token sees what its prompt's last token saw."""
    if cross_attention_mask is not None:
        mask = cross_attention_mask.clone()
        for b, p in enumerate(prompts):  # positions past a row's prompt repeat its last row
            mask[b, len(p) :] = mask[b, len(p) - 1]
        cross_attention_mask = mask
    model.bind_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, image_features)
    try:
        return generate(model, prompts, params, stop_ids, pad_id)
    finally:
        model.clear_images()


__all__ = [
    "MultimodalKVCache",
    "MultimodalLlama",
    "cross_attention_mask_from_tokens",
    "fusion_schedule",
    "generate_with_images",
]
