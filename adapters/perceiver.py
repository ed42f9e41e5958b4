"""The temporal aggregator of the video adapter (paper §7.2.3): a perceiver resampler that merges every
`frames_per_group` (32) consecutive frames into one set of `n_latents` learned latents (64 frames → 2
sets, 16 → 1). The design is Flamingo's (Alayrac et al. 2022) as open_flamingo's `PerceiverResampler`
implements it; `tests/adapters/test_perceiver.py` checks it against lucidrains' flamingo-pytorch, whose
attention and feed-forward open_flamingo copied.

    frame tokens (B, F, n, D) + frame-time embedding[f mod 32] + group embedding[f div 32]
      → groups of 32 frames, tokens flattened                           (B·G, 32·n, D)
      → per layer: latents += attn(q = LN(latents), k/v = [LN(frame tokens) ; LN(latents)])
                   latents += FFN(latents)               (LayerNorm, Linear, GELU, Linear; no biases)
      → LayerNorm                                                       (B, G, L, D)

The latents attend to the frames' tokens *and to themselves* (Flamingo's choice, so a group whose frames
are all masked still has keys). Attention has no positions: the tokens of a frame are a set, and only
the frame-time embedding (open_flamingo's `frame_embs`) tells frames apart, so the order of the frames in
a group is visible. The group embedding (open_flamingo's `media_time_embs`) tells the groups apart.
`frame_mask` removes padded or repeated frames from the keys (their content has no effect), and
`token_mask` padded tiles.

Sizes: the paper gives 0.6B (8B) and 4.6B (70B) parameters for the aggregator and the video
cross-attention layers together, with no split and no resampler shape. The video cross-attention blocks,
sized like the LLM's layers, hold 0.436B and 4.278B; the presets below give the resampler the rest
(one layer; FFN ×4 at 4096 wide, ×2 at 8192), 0.143B and 0.285B (docs/video.md).

Shapes: B batch, F frames, n tokens per frame, G groups, L latents, D width, H heads, hd head dim.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerceiverArgs:
    dim: int = 4096  # width of the frame tokens (the projector's output: the LLM's width)
    n_layers: int = 1
    n_heads: int = 8
    head_dim: int = 64
    ffn_mult: float = 4.0
    n_latents: int = 64  # latents per group: the video tokens one group hands the LLM
    frames_per_group: int = 32  # consecutive frames merged into one set of latents (paper: 32)
    max_groups: int = 2  # 64 frames at most (paper: up to 64)
    # learned embeddings of a token's place within its frame (0 = none, open_flamingo's resampler): the
    # tokens of a frame are otherwise a set to the latents, which then read *what* is in a frame more
    # easily than *where* (measured in the video quickstart: docs/video.md)
    spatial_tokens: int = 0
    # a learned scale per frame and value channel on the frame tokens' values, zero at first (then the
    # resampler is open_flamingo's): with signed scales one attention sum over a moving object's frames
    # is its displacement, which plain attention (positive weights on shared values) cannot form
    time_scaled_values: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "head_dim", "n_latents", "frames_per_group", "max_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PerceiverArgs.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.spatial_tokens < 0:
            raise ValueError(f"PerceiverArgs.spatial_tokens must be ≥ 0, got {self.spatial_tokens}")
        if self.ffn_mult <= 0:
            raise ValueError(f"PerceiverArgs.ffn_mult must be > 0, got {self.ffn_mult}")

    @property
    def inner_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.dim * self.ffn_mult)

    @property
    def max_frames(self) -> int:
        return self.frames_per_group * self.max_groups

    def num_groups(self, num_frames: int) -> int:
        """Sets of latents `num_frames` frames become: ⌈F / frames_per_group⌉ (64 → 2, 16 → 1)."""
        return math.ceil(num_frames / self.frames_per_group)

    def num_params(self) -> int:
        """Exact parameter count of `PerceiverResampler(self)`."""
        d, i = self.dim, self.inner_dim
        attention = 4 * d + 4 * d * i  # two LayerNorms; q, k, v, out
        ffn = 2 * d + 2 * d * self.ffn_dim
        embeddings = (self.n_latents + self.frames_per_group + self.max_groups + self.spatial_tokens) * d
        if self.time_scaled_values:
            attention += self.frames_per_group * i
        return self.n_layers * (attention + ffn) + embeddings + 2 * d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS: dict[str, Any] = {
    # Beside Llama 3 8B (width 4096): with 2 video cross-attention blocks, 0.579B (paper: 0.6B).
    "llama3_8b": lambda: PerceiverArgs(dim=4096),
    # Beside Llama 3 70B (width 8192): with 5 video cross-attention blocks, 4.563B (paper: 4.6B).
    "llama3_70b": lambda: PerceiverArgs(dim=8192, ffn_mult=2.0),
    # open_flamingo's default resampler (6 layers, FFN ×4) at a given width, for comparison.
    "open_flamingo": lambda: PerceiverArgs(dim=1024, n_layers=6),
    # CPU tests: the paper's 32 frames per group, tiny widths.
    "tiny": lambda: PerceiverArgs(dim=64, n_layers=2, n_heads=4, head_dim=16, ffn_mult=2.0, n_latents=8),
}

PERCEIVER_PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_perceiver_preset(name: str, **overrides: Any) -> PerceiverArgs:
    """A named resampler, optionally with fields replaced (`get_perceiver_preset("tiny", dim=32)`)."""
    if name not in _PRESETS:
        raise KeyError(
            f"unknown perceiver preset {name!r}; known presets: {', '.join(PERCEIVER_PRESET_NAMES)}"
        )
    args = _PRESETS[name]()
    return dataclasses.replace(args, **overrides) if overrides else args


class PerceiverAttention(nn.Module):
    """Latents attend to [frame tokens ; latents] (open_flamingo's `PerceiverAttention`, with a key mask)."""

    def __init__(self, args: PerceiverArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.norm_media = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.norm_latents = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.to_q = nn.Linear(args.dim, args.inner_dim, bias=False)
        self.to_kv = nn.Linear(args.dim, 2 * args.inner_dim, bias=False)
        self.to_out = nn.Linear(args.inner_dim, args.dim, bias=False)
        self.frames_per_group = args.frames_per_group
        # (frames_per_group, H·hd), zero-initialised: see PerceiverArgs.time_scaled_values
        self.value_time_scale = (
            nn.Parameter(torch.zeros(args.frames_per_group, args.inner_dim))
            if args.time_scaled_values
            else None
        )

    def forward(
        self,
        x: torch.Tensor,  # (R, M, D) frame tokens of R groups
        latents: torch.Tensor,  # (R, L, D)
        key_mask: torch.Tensor | None = None,  # bool (R, M), True = a real token
    ) -> torch.Tensor:
        R, L, _ = latents.shape
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents).view(R, L, self.n_heads, self.head_dim).transpose(1, 2)  # (R, H, L, hd)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (R, M+L, H·hd) each
        if self.value_time_scale is not None:  # frame f's tokens: values × (1 + scale[f])
            M = x.shape[1]
            scale = 1 + self.value_time_scale.repeat_interleave(
                M // self.frames_per_group, dim=0
            )  # (M, H·hd)
            v = torch.cat([v[:, :M] * scale, v[:, M:]], dim=1)
        k = k.view(R, -1, self.n_heads, self.head_dim).transpose(1, 2)  # (R, H, M+L, hd)
        v = v.view(R, -1, self.n_heads, self.head_dim).transpose(1, 2)
        mask = None
        if key_mask is not None:  # the latents' own keys are always there: no row is empty
            own = torch.ones(R, L, dtype=torch.bool, device=key_mask.device)
            mask = torch.cat([key_mask.bool(), own], dim=1)[:, None, None, :]  # (R, 1, 1, M+L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (R, H, L, hd)
        return self.to_out(out.transpose(1, 2).reshape(R, L, -1))  # (R, L, D)


class PerceiverLayer(nn.Module):
    def __init__(self, args: PerceiverArgs) -> None:
        super().__init__()
        self.attention = PerceiverAttention(args)
        self.feed_forward = nn.Sequential(  # open_flamingo's FeedForward: no biases, exact GELU
            nn.LayerNorm(args.dim, eps=args.norm_eps),
            nn.Linear(args.dim, args.ffn_dim, bias=False),
            nn.GELU(),
            nn.Linear(args.ffn_dim, args.dim, bias=False),
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.attention(x, latents, key_mask)
        return latents + self.feed_forward(latents)


class PerceiverResampler(nn.Module):
    """Frame tokens (B, F, n, D) → latents (B, G, L, D), one set per `frames_per_group` frames."""

    def __init__(self, args: PerceiverArgs) -> None:
        super().__init__()
        self.args = args
        d = args.dim
        self.latents = nn.Parameter(torch.empty(args.n_latents, d))
        self.frame_embeddings = nn.Parameter(torch.empty(args.frames_per_group, d))  # time inside a group
        self.group_embeddings = nn.Parameter(torch.empty(args.max_groups, d))  # which group
        # where in the frame (tile-major token order), when args.spatial_tokens says how many
        self.spatial_embeddings = (
            nn.Parameter(torch.empty(args.spatial_tokens, d)) if args.spatial_tokens else None
        )
        self.layers = nn.ModuleList([PerceiverLayer(args) for _ in range(args.n_layers)])
        self.norm = nn.LayerNorm(d, eps=args.norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """open_flamingo's: latents and time embeddings ~ N(0, 1) (LayerNorm'd before use), torch's
        default for the linear layers; a built-on-meta model calls this after materialising."""
        for p in (self.latents, self.frame_embeddings, self.group_embeddings, self.spatial_embeddings):
            if p is None:
                continue
            nn.init.normal_(p)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.LayerNorm):
                module.reset_parameters()
            if isinstance(module, PerceiverAttention) and module.value_time_scale is not None:
                nn.init.zeros_(module.value_time_scale)

    def forward(
        self,
        x: torch.Tensor,  # (B, F, n, D) tokens of each frame
        frame_mask: torch.Tensor | None = None,  # bool (B, F), False = padding or a repeated frame
        token_mask: torch.Tensor | None = None,  # bool (B, F, n), False = a padded tile's token
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents (B, G, L, D), group_mask (B, G)); group_mask is False where no frame was real."""
        a = self.args
        B, Fr, n, width = x.shape
        if width != a.dim:
            raise ValueError(f"frame tokens are {width} wide, the resampler's dim is {a.dim}")
        groups = a.num_groups(Fr)
        if groups > a.max_groups:
            raise ValueError(
                f"{Fr} frames make {groups} groups of {a.frames_per_group}; this resampler has group embeddings "
                f"for {a.max_groups} (at most {a.max_frames} frames)"
            )
        keep = torch.ones(B, Fr, n, dtype=torch.bool, device=x.device)
        if frame_mask is not None:
            keep = keep & frame_mask.bool().to(x.device)[:, :, None]
        if token_mask is not None:
            keep = keep & token_mask.bool().to(x.device)
        pad = groups * a.frames_per_group - Fr  # the last group's missing frames: zeros, masked
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            keep = F.pad(keep, (0, 0, 0, pad))
        x = x.view(B, groups, a.frames_per_group, n, width)
        x = (
            x
            + self.frame_embeddings[None, None, :, None, :]
            + self.group_embeddings[None, :groups, None, None, :]
        )
        if self.spatial_embeddings is not None:
            if n != a.spatial_tokens:
                raise ValueError(
                    f"frames have {n} tokens, the resampler's spatial embeddings {a.spatial_tokens}"
                )
            x = x + self.spatial_embeddings[None, None, None, :, :]
        x = x.reshape(B * groups, a.frames_per_group * n, width)  # (B·G, 32·n, D)
        keep = keep.view(B * groups, a.frames_per_group * n)
        key_mask = None if bool(keep.all()) else keep
        latents = self.latents.expand(B * groups, -1, -1)  # (B·G, L, D)
        for layer in self.layers:
            latents = layer(x, latents, key_mask)
        out = self.norm(latents).view(B, groups, a.n_latents, width)
        return out, keep.view(B, groups, -1).any(dim=-1)


__all__ = [
    "PERCEIVER_PRESET_NAMES",
    "PerceiverArgs",
    "PerceiverAttention",
    "PerceiverLayer",
    "PerceiverResampler",
    "get_perceiver_preset",
]
