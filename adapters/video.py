"""The video adapter (paper §7.2.3): the perceiver resampler plus video cross-attention layers that a
`MultimodalLlama` runs beside its image cross-attention layers.

    frames (B, F, K, 3, S, S) ─▶ image encoder, per frame ─▶ (B, F, K, N, Dv) ─▶ the image projector
      ─▶ frame tokens (B, F, K·N, D) ─▶ PerceiverResampler ─▶ latents (B, G, L, D), G = ⌈F / 32⌉
      ─▶ video tokens (B, G·L, D) ─▶ K/V of every video cross-attention layer

Placement ("before every fourth image cross-attention layer"): counting the image cross-attention layers
the way `fusion_schedule` counts the LLM's layers, from the last one back (`video_schedule`), a video
cross-attention layer runs right before every 4th of them, at the same point of the LLM. With Meta's
image schedule for a 32-layer LLM (image layers before self-attention layers 3, 7, …, 31: 8 of them)
the video layers sit before LLM layers 15 and 31, i.e. before the 4th and 8th image layers; the 70B's
20 image layers (3, 7, …, 79) get 5 video layers (15, 31, 47, 63, 79); the 405B's 32 image layers
(1, 5, …, 125) get 8 (13, 29, …, 125). Each block is a `CrossAttentionBlock` sized like the LLM's layers
with both tanh gates at 0, so a fresh video adapter changes no output, with or without a video.

The frozen LLM's width is the resampler's: the image projector (shared with images, so a video model
built from an image checkpoint starts from the projector images were trained with) maps each frame's
encoder features to the LLM width before the resampler. A batch without video skips the resampler and
the video layers; `frame_mask` hides padded and repeated frames from the resampler, and a group with no
real frame is hidden from the text.

Text-side mask (`video_cross_attention_mask`): (B, T), nonzero = text token t sees the whole video, or
(B, T, G) per group; None = every token sees every group that has a real frame.

Shapes: B batch, T text tokens, F frames, K tiles, N tokens per tile, G groups, L latents, D LLM width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from herd.adapters.cross_attention import CrossAttentionBlock
from herd.adapters.perceiver import PerceiverArgs, PerceiverResampler
from herd.text.args import ModelArgs

# The keyword inputs of `MultimodalLlama.forward` that carry a video (what `collate_videos` returns,
# plus the text-side mask and precomputed features).
VIDEO_INPUTS = (
    "video_pixel_values",  # (B, F, K, 3, S, S)
    "video_aspect_ratio_ids",  # (B, F)
    "video_aspect_ratio_mask",  # (B, F, K)
    "video_frame_mask",  # (B, F) bool
    "video_features",  # (B, F, K, N, Dv) instead of pixels: the image encoder's output
    "video_cross_attention_mask",  # (B, T) or (B, T, G)
)


def video_schedule(image_layers: Sequence[int], every: int = 4) -> list[int]:
    """LLM layer indices of the video cross-attention layers: before every `every`-th image layer,
    counted from the last image layer back (as `fusion_schedule` counts self-attention layers)."""
    if every < 1:
        raise ValueError(f"video_every must be ≥ 1, not {every}")
    layers = sorted(int(i) for i in image_layers)
    return [layers[i] for i in list(range(len(layers)))[::-1][::every][::-1]]


def write_rows(buf: torch.Tensor | None, max_len: int, start_pos: int, rows: torch.Tensor) -> torch.Tensor:
    """Mask rows (B, T, N) written at start_pos of a (B, max_len, N) buffer (a KV cache's per-position
    cross-attention mask); later positions repeat the last row, as decoding continues the prompt."""
    B, T, N = rows.shape
    if buf is None or buf.shape[-1] != N:
        buf = torch.ones(B, max_len, N, dtype=torch.bool, device=rows.device)
    buf[:, start_pos : start_pos + T] = rows.bool()
    buf[:, start_pos + T :] = rows[:, -1:].bool()
    return buf


class VideoAdapter(nn.Module):
    """The resampler and the video cross-attention blocks (keyed by the LLM layer they precede)."""

    def __init__(
        self,
        llm_args: ModelArgs,
        args: PerceiverArgs,
        layers: Sequence[int],
        mask_attention_rows: bool = True,
    ) -> None:
        super().__init__()
        if args.dim != llm_args.dim:
            raise ValueError(f"the resampler's dim {args.dim} must be the LLM's width {llm_args.dim}")
        bad = [i for i in layers if not 0 <= int(i) <= llm_args.n_layers]
        if bad or not layers:
            raise ValueError(
                f"video cross-attention layers {list(layers)} must be non-empty, in 0..{llm_args.n_layers}"
            )
        self.args = args
        self.layers = tuple(sorted({int(i) for i in layers}))
        self.resampler = PerceiverResampler(args)
        self.cross_attention = nn.ModuleDict(
            {str(i): CrossAttentionBlock(llm_args, mask_attention_rows) for i in self.layers}
        )
        for block in self.cross_attention.values():
            block.init_weights()  # gates at zero: the model's outputs do not change

    def tokens(
        self,
        frame_tokens: torch.Tensor,  # (B, F, K·N, D) projected encoder features of each frame
        frame_mask: torch.Tensor | None = None,  # bool (B, F)
        tile_mask: torch.Tensor | None = None,  # (B, F, K), 1 = a real tile
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Video tokens (B, G·L, D) that cross-attention reads, and group_mask (B, G)."""
        token_mask = None
        if tile_mask is not None:  # a padded tile's tokens are no keys of the resampler
            per_tile = frame_tokens.shape[2] // tile_mask.shape[-1]
            token_mask = tile_mask.bool().repeat_interleave(per_tile, dim=-1)  # (B, F, K·N)
        latents, groups = self.resampler(frame_tokens, frame_mask, token_mask)  # (B, G, L, D), (B, G)
        return latents.flatten(1, 2), groups

    def kv(self, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values (B, K, G·L, hd) of every video cross-attention layer, computed once per video."""
        return {key: block.image_kv(tokens) for key, block in self.cross_attention.items()}

    def token_mask(
        self,
        groups: torch.Tensor,  # bool (B, G): the group has a real frame
        length: int,  # text tokens T
        rows: torch.Tensor | None = None,  # (B, T) or (B, T, G), nonzero = may see
    ) -> torch.Tensor | None:
        """Per text token, the video tokens it may see: bool (B, T, G·L); None when every token sees all."""
        if rows is None:
            if bool(groups.all()):
                return None
            allowed = groups[:, None, :].expand(-1, length, -1)
        else:
            rows = rows.bool().to(groups.device)
            if rows.dim() == 2:
                rows = rows[:, :, None]
            if rows.shape[1] != length or rows.shape[2] not in (1, groups.shape[1]):
                raise ValueError(
                    f"video_cross_attention_mask {tuple(rows.shape)} must be (B, {length}) or "
                    f"(B, {length}, {groups.shape[1]}) for {length} tokens and {groups.shape[1]} groups"
                )
            allowed = rows & groups[:, None, :]  # (B, T, G)
        return allowed.repeat_interleave(self.args.n_latents, dim=2)  # (B, T, G·L)

    def cached_token_mask(
        self, groups: torch.Tensor, length: int, start_pos: int, rows: torch.Tensor | None, cache: Any
    ) -> torch.Tensor | None:
        """`token_mask` during decoding: rows given at prefill are kept per position in the cache
        (`video_token_mask`), later steps read theirs from it."""
        if rows is not None:
            if rows.shape[1] == start_pos + length and start_pos > 0:
                rows = rows[:, start_pos:]  # a mask of the whole sequence so far
            mask = self.token_mask(groups, length, rows)
            if cache is not None and mask is not None:
                cache.video_token_mask = write_rows(
                    cache.video_token_mask, cache.max_seq_len, start_pos, mask
                )
            return mask
        if cache is not None and cache.video_token_mask is not None:
            if not isinstance(start_pos, int):  # a static cache's step: gather, no Python int
                index = start_pos.reshape(-1)[:1] + torch.arange(length, device=start_pos.device)
                return cache.video_token_mask.index_select(1, index)
            return cache.video_token_mask[:, start_pos : start_pos + length]
        return self.token_mask(groups, length)


__all__ = ["VIDEO_INPUTS", "VideoAdapter", "video_schedule", "write_rows"]
