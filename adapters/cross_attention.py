"""Gated cross-attention layers (paper §7.2.2): text queries attend to image tokens, tanh-gated.

One `CrossAttentionBlock` = Meta's `CrossAttentionTransformerBlock` (transformers'
`MllamaCrossAttentionDecoderLayer`):

    h = x + tanh(g_attn) · wo(row_mask · attn(q_norm(wq · norm(x)), k_norm(wk · img), wv · img))
    y = h + tanh(g_ffwd) · row_mask · SwiGLU(ffn_norm(h))

GQA with the LLM's head layout, RMSNorm on every query and key head, no RoPE (image tokens have no
text position). Both gates start at zero, so a fresh block returns its input exactly.

`row_mask` marks the text rows that may see at least one image token (a row before its `<|image|>`
sees none). Such a row attends to all image tokens (an all-masked softmax is undefined) and its
attention and FFN outputs are multiplied by 0: the block leaves it unchanged. transformers' Mllama only
zeroes the FFN output (huggingface/transformers#39379); `mask_attention_rows=False` reproduces that.

Shape legend: B batch, T text tokens, N image tokens, D model dim, H heads, K kv heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.text.args import ModelArgs
from herd.text.model import FeedForward, RMSNorm


@dataclass
class CrossAttentionMask:
    """What every cross-attention layer of one forward pass shares."""

    mask: torch.Tensor | None  # bool (B, 1, T, N), True = may attend; None → every image token
    row_mask: torch.Tensor | None  # bool (B, 1, T, 1), True = the row sees some image token


def build_cross_attention_mask(
    token_mask: torch.Tensor | None,  # bool/int (B, T, N), nonzero = text token t may see image token n
) -> CrossAttentionMask:
    """Per-token mask → SDPA mask and row mask; rows that see nothing attend to all (then zeroed)."""
    if token_mask is None:
        return CrossAttentionMask(None, None)
    allowed = token_mask.bool()
    rows = allowed.any(dim=-1, keepdim=True)  # (B, T, 1)
    allowed = allowed | ~rows  # an all-False softmax row would be NaN
    return CrossAttentionMask(allowed[:, None], rows[:, None])


class CrossAttention(nn.Module):
    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, norm_eps: float, mask_rows: bool = True
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.mask_rows = mask_rows
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps)
        self.k_norm = RMSNorm(self.head_dim, norm_eps)

    def image_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image tokens (B, N, D) → keys and values (B, K, N, hd), computed once per image."""
        B, N, _ = image.shape
        k = self.k_norm(self.wk(image).view(B, N, self.n_kv_heads, self.head_dim))
        v = self.wv(image).view(B, N, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D), normalised
        kv: tuple[torch.Tensor, torch.Tensor],  # (B, K, N, hd) each
        mask: CrossAttentionMask,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        k, v = kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.mask, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, hd)
        if self.mask_rows and mask.row_mask is not None:
            out = out * mask.row_mask.to(out.dtype)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def init_weights(self, std: float = 0.02) -> None:
        for lin in (self.wq, self.wk, self.wv, self.wo):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()


class CrossAttentionBlock(nn.Module):
    """Cross-attention + SwiGLU FFN, each tanh-gated (gates start at 0); sized like the LLM's layers."""

    def __init__(self, args: ModelArgs, mask_rows: bool = True) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = CrossAttention(args.dim, args.n_heads, args.n_kv_heads, args.norm_eps, mask_rows)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def image_kv(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention.image_kv(image)

    def forward(
        self,
        h: torch.Tensor,  # (B, T, D)
        kv: tuple[torch.Tensor, torch.Tensor],  # (B, K, N, hd) each, from `image_kv`
        mask: CrossAttentionMask,
    ) -> torch.Tensor:
        h = h + self.gate_attn.tanh() * self.attention(self.attention_norm(h), kv, mask)
        ffn = self.feed_forward(self.ffn_norm(h))
        if mask.row_mask is not None:
            ffn = mask.row_mask[:, 0].to(ffn.dtype) * ffn  # (B, T, 1)
        return h + self.gate_ffwd.tanh() * ffn

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(std)
        self.feed_forward.init_weights(std, std)
        self.gate_attn.zero_()
        self.gate_ffwd.zero_()


__all__ = ["CrossAttention", "CrossAttentionBlock", "CrossAttentionMask", "build_cross_attention_mask"]
