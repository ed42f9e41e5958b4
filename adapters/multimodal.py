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

Video (`herd.adapters.video`): `video=PerceiverArgs(...)` or `add_video(...)` adds the perceiver resampler
and video cross-attention layers before every 4th image cross-attention layer; the `video_*` keyword
inputs (`collate_videos`) go through the same encoder and projector, then the resampler. Without them
the video layers are skipped, and their gates start at zero: adding video changes no output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from herd.adapters.cross_attention import CrossAttentionBlock, CrossAttentionMask, build_cross_attention_mask
from herd.adapters.perceiver import PerceiverArgs
from herd.adapters.video import VIDEO_INPUTS, VideoAdapter, video_schedule, write_rows
from herd.text.generation import EAGER_STEPS, Completion, DecodeSteps, SamplingParams, generate
from herd.text.kv_cache import KVCache, StaticKVCache
from herd.text.model import Llama

if TYPE_CHECKING:
    from herd.vision.encoder import VisionEncoder


def fusion_schedule(n_layers: int, every: int = 4) -> list[int]:
    """Meta's placement: cross-attention before self-attention layers n−1, n−1−every, … (ascending)."""
    if every < 1:
        raise ValueError(f"cross_attention_every must be ≥ 1, not {every}")
    return list(range(n_layers))[::-1][::every][::-1]


class MultimodalKVCache(KVCache):
    """The LLM's self-attention cache plus the bound images and video: per cross-attention layer K/V
    (B, K, N, hd) and the per-position cross-attention masks (B, S_max, N)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_media()

    def _init_media(self) -> None:
        self.image_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.token_mask: torch.Tensor | None = None  # bool (B, S_max, N)
        self.video_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.video_groups: torch.Tensor | None = None  # bool (B, G)
        self.video_token_mask: torch.Tensor | None = None  # bool (B, S_max, G·L)

    def store_mask(self, start_pos: int, rows: torch.Tensor) -> None:
        """Write image mask rows (B, T, N) at start_pos."""
        self.token_mask = write_rows(self.token_mask, self.max_seq_len, start_pos, rows)

    def expand_rows(self, repeats: int, length: int) -> MultimodalKVCache:
        base = super().expand_rows(repeats, length)
        out = MultimodalKVCache.__new__(MultimodalKVCache)
        out.__dict__.update(base.__dict__)
        out.image_kv = {
            k: (a.repeat_interleave(repeats, 0), b.repeat_interleave(repeats, 0))
            for k, (a, b) in self.image_kv.items()
        }
        out.video_kv = {
            k: (a.repeat_interleave(repeats, 0), b.repeat_interleave(repeats, 0))
            for k, (a, b) in self.video_kv.items()
        }
        for name in ("token_mask", "video_groups", "video_token_mask"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value.repeat_interleave(repeats, 0))
        return out


class StaticMultimodalKVCache(StaticKVCache, MultimodalKVCache):
    """`MultimodalKVCache` whose self-attention K/V are read whole (`StaticKVCache`): the compiled step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        StaticKVCache.__init__(self, *args, **kwargs)  # per-layer buffers, not the (L, ...) ones
        self._init_media()


def rows_at(buf: torch.Tensor, start_pos: int | torch.Tensor, length: int) -> torch.Tensor:
    """Rows start_pos..start_pos+length-1 of a per-position buffer (B, S_max, N); a tensor start_pos
    (a static cache's step) gathers them instead of slicing, so no Python int depends on it."""
    if isinstance(start_pos, int):
        return buf[:, start_pos : start_pos + length]
    return buf.index_select(1, start_pos.reshape(-1)[:1] + torch.arange(length, device=buf.device))


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
        video: PerceiverArgs | None = None,  # a video adapter: resampler + video cross-attention layers
        video_every: int = 4,  # a video layer before every 4th image cross-attention layer
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
        self.mask_attention_rows = mask_attention_rows
        self.video: VideoAdapter | None = None
        if video is not None:
            self.add_video(video, video_every)
        if freeze_llm:
            self.freeze_llm()

    def add_video(
        self, args: PerceiverArgs, every: int = 4, layers: Sequence[int] | None = None
    ) -> VideoAdapter:
        """Add the video adapter (`herd.adapters.video`), placed by `video_schedule` unless `layers` says;
        its gates start at zero, so every output stays what it was."""
        if self.video is not None:
            raise ValueError("this model already has a video adapter")
        layers = video_schedule(self.cross_attention_layers, every) if layers is None else layers
        ref = next(self.llm.parameters())
        adapter = VideoAdapter(self.llm.args, args, layers, self.mask_attention_rows)
        self.video = adapter.to(device=ref.device, dtype=ref.dtype)
        return self.video

    # --- training helpers ---------------------------------------------------------------------------
    def freeze_llm(self) -> None:
        """The LLM's parameters never change (paper §7): no gradients, so no optimizer state either."""
        self.llm.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: encoder, projector, cross-attention layers, image-token embeddings
        and the video adapter."""
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

    def encode_video(
        self,
        video_pixel_values: torch.Tensor | None = None,  # (B, F, K, C, S, S)
        video_aspect_ratio_ids: torch.Tensor | None = None,  # (B, F)
        video_aspect_ratio_mask: torch.Tensor | None = None,  # (B, F, K)
        video_frame_mask: torch.Tensor | None = None,  # bool (B, F)
        video_features: torch.Tensor | None = None,  # (B, F, K, N, Dv) precomputed encoder output
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The video-only path: each frame through the image encoder and projector, then the resampler.
        Returns video tokens (B, G·L, D) and group_mask (B, G)."""
        if self.video is None:
            raise ValueError(
                "this model has no video adapter: build it with video=PerceiverArgs(...) or add_video"
            )
        if video_features is None:
            if video_pixel_values is None or video_aspect_ratio_ids is None:
                raise ValueError("video_pixel_values needs video_aspect_ratio_ids (B, F)")
            if video_aspect_ratio_mask is None and self.vision is not None:
                video_aspect_ratio_mask = self.vision.aspect_ratio_mask(video_aspect_ratio_ids)
        x = self.encode_images(
            video_pixel_values, video_aspect_ratio_ids, video_aspect_ratio_mask, video_features
        )
        B, Fr = (video_features if video_features is not None else video_pixel_values).shape[:2]
        x = x.view(B, Fr, -1, x.shape[-1])  # (B, F, K·N, D)
        return self.video.tokens(x, video_frame_mask, video_aspect_ratio_mask)

    def _video_context(
        self, length: int, start_pos: int, kv_cache: KVCache | None, videos: dict[str, Any]
    ) -> _Images | None:
        if self.video is None:
            if any(v is not None for v in videos.values()):
                raise ValueError("video inputs given, but this model has no video adapter (add_video)")
            return None
        cache = kv_cache if isinstance(kv_cache, MultimodalKVCache) else None
        rows = videos.pop("video_cross_attention_mask", None)
        if videos.get("video_pixel_values") is not None or videos.get("video_features") is not None:
            if kv_cache is not None and cache is None:
                raise ValueError(
                    "a video with a KV cache needs the model's own cache: use model.new_kv_cache"
                )
            tokens, groups = self.encode_video(**videos)
            kv = self.video.kv(tokens)
            if cache is not None:
                cache.video_kv, cache.video_groups, cache.video_token_mask = kv, groups, None
        elif cache is not None and cache.video_kv:
            kv, groups = cache.video_kv, cache.video_groups
        else:
            return None  # no video: the video cross-attention layers are skipped
        assert groups is not None
        token_mask = self.video.cached_token_mask(groups, length, start_pos, rows, cache)
        return _Images(kv, build_cross_attention_mask(token_mask))

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
            token_mask = rows_at(cache.token_mask, start_pos, length)
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
        video_pixel_values: torch.Tensor | None = None,  # (B, F, T_tiles, C, S, S)
        video_aspect_ratio_ids: torch.Tensor | None = None,  # (B, F)
        video_aspect_ratio_mask: torch.Tensor | None = None,  # (B, F, T_tiles)
        video_frame_mask: torch.Tensor | None = None,  # bool (B, F), False = padded or repeated frame
        video_features: torch.Tensor | None = None,  # (B, F, T_tiles, N, Dv) instead of video pixels
        video_cross_attention_mask: torch.Tensor | None = None,  # (B, T) or (B, T, G)
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
        videos = {
            "video_pixel_values": video_pixel_values,
            "video_aspect_ratio_ids": video_aspect_ratio_ids,
            "video_aspect_ratio_mask": video_aspect_ratio_mask,
            "video_frame_mask": video_frame_mask,
            "video_features": video_features,
            "video_cross_attention_mask": video_cross_attention_mask,
        }
        vid = self._video_context(T, start_pos, kv_cache, videos)
        ctx = self.llm.attention_context(T, start_pos, document_ids, None, h.device, kv_cache)
        for key, layer in [*self.llm.layers.items(), (str(self.args.n_layers), None)]:
            if vid is not None and key in self.video.cross_attention:  # type: ignore[union-attr]
                h = self.video.cross_attention[key](h, vid.kv[key], vid.mask)  # type: ignore[union-attr]
            if img is not None and key in self.cross_attention:
                h = self.cross_attention[key](h, img.kv[key], img.mask)
            if layer is not None:
                h = layer(h, ctx, kv_cache)
        return self.llm.head(h)  # (B, T, V)

    # --- decoding -----------------------------------------------------------------------------------
    def bind_images(
        self,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,  # (B, T_prompt, M, T_tiles), per position
        image_features: torch.Tensor | None = None,
        **videos: torch.Tensor | None,  # the `video_*` inputs of `forward`
    ) -> None:
        """Images (and a video) for the next `new_kv_cache`: it encodes them once and holds K/V and masks."""
        unknown = sorted(set(videos) - set(VIDEO_INPUTS))
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}; video inputs are {', '.join(VIDEO_INPUTS)}")
        self._bound = {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
            "image_features": image_features,
            "cross_attention_mask": cross_attention_mask,
            "videos": {k: v for k, v in videos.items() if v is not None},
        }

    def clear_images(self) -> None:
        self._bound = None

    def new_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,  # a `StaticMultimodalKVCache` for a compiled decode step
    ) -> MultimodalKVCache:
        cls = StaticMultimodalKVCache if static else MultimodalKVCache
        cache = self.llm.new_kv_cache(batch_size, max_seq_len, dtype, cache_cls=cls)
        if self._bound is not None:
            images = dict(self._bound)
            mask = images.pop("cross_attention_mask")
            videos = images.pop("videos")
            if videos:
                video = videos.get("video_pixel_values", videos.get("video_features"))
                if video is None or video.shape[0] != batch_size:
                    raise ValueError(f"the bound video does not match the batch of {batch_size} rows")
                rows = videos.get("video_cross_attention_mask")
                if rows is not None:  # per position of the prompt, stored in the cache like the image mask
                    videos = dict(videos, video_cross_attention_mask=rows[:, : cache.max_seq_len])
                self._video_context(
                    0 if rows is None else min(rows.shape[1], cache.max_seq_len), 0, cache, dict(videos)
                )
            first = images["pixel_values"] if images["pixel_values"] is not None else images["image_features"]
            if first is None and videos:
                return cache  # a video, no image
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
    steps: DecodeSteps = EAGER_STEPS,  # static-cache / compiled decoding (herd.fast_decode)
    vocab_limit: int | None = None,  # sample only ids below it (a trimmed tokenizer, as `generate`)
    **videos: torch.Tensor | None,  # the `video_*` inputs of `MultimodalLlama.forward`
) -> list[Completion]:
    """`herd.text.generate` with images and/or a video: every generated token sees what its prompt's
    last token saw."""

    def past_prompt(mask: torch.Tensor) -> torch.Tensor:
        mask = mask.clone()
        for b, p in enumerate(prompts):  # positions past a row's prompt repeat its last row
            mask[b, len(p) :] = mask[b, len(p) - 1]
        return mask

    if cross_attention_mask is not None:
        cross_attention_mask = past_prompt(cross_attention_mask)
    if videos.get("video_cross_attention_mask") is not None:
        videos["video_cross_attention_mask"] = past_prompt(videos["video_cross_attention_mask"])
    model.bind_images(
        pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, image_features, **videos
    )
    try:
        return generate(model, prompts, params, stop_ids, pad_id, steps=steps, vocab_limit=vocab_limit)
    finally:
        model.clear_images()


__all__ = [
    "MultimodalKVCache",
    "StaticMultimodalKVCache",
    "MultimodalLlama",
    "cross_attention_mask_from_tokens",
    "fusion_schedule",
    "generate_with_images",
]
