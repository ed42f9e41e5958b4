"""Rotary position embeddings with Llama 3.1 / 3.2 frequency scaling.

Pairs are interleaved (dims 2i, 2i+1 rotate together), as in Meta's reference `apply_rotary_emb`;
computed with real arithmetic (no complex tensors) so that DTensor and torch.compile handle it.
"""

from __future__ import annotations

import math

import torch

from herd.text.args import ModelArgs, RopeScaling


def scale_frequencies(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling: keep high frequencies, divide low ones by `factor`, blend in between."""
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)


def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/hd), i < hd/2, fp32 (hd/2,)."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if args.rope_scaling is not None:
        freqs = scale_frequencies(freqs, args.rope_scaling)
    return freqs


def rope_cos_sin(
    args: ModelArgs, seq_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, hd/2) fp32."""
    freqs = rope_frequencies(args, device)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (seq_len, hd/2)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, heads, hd); cos/sin broadcast to (B|1, T, 1, hd/2)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, heads, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, hd) and k (B, T, K, hd); cos/sin are (T, hd/2) or per-row (B, T, hd/2)."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
