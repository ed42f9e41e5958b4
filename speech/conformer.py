"""The speech encoder (paper §8.1.1): frame stacking, a projection and Conformer blocks with rotary attention.

    log-mel (B, T, 80), lengths (B,)             10 ms frames
      → frames ≥ length zeroed, T padded to a multiple of 4
      → 4 consecutive frames stacked              (B, T/4, 320)
      → Linear 320 → D                            (B, T', D), T' = ⌈T/4⌉: 40 ms frames
      → n_layers × ConformerBlock                 (B, T', D)

A block is the Conformer's Macaron sandwich (Gulati et al. 2020), in torchaudio's `ConformerLayer` order:
x + ½·FFN(x); x + MHSA(LN x); x + Conv(x); x + ½·FFN(x); LayerNorm.

What comes from torchaudio and what does not (torchaudio.models.conformer, 2.11):
- the feed-forward module *is* torchaudio's `_FeedForwardModule` (LayerNorm → Linear → SiLU → Dropout →
  Linear → Dropout): it fits as it is;
- the attention is ours: torchaudio's layer uses `nn.MultiheadAttention` with no positional information
  at all, and the paper's attention is rotary (RoPE on q and k, `herd.text.rope`'s rotation);
- the convolution module is ours, with the same layout (LayerNorm → pointwise 2D → GLU → depthwise k →
  norm → SiLU → pointwise → Dropout) but two changes: (1) the norm after the depthwise conv is a per-frame
  LayerNorm, not BatchNorm/GroupNorm: BatchNorm's batch statistics let padded frames and the other
  utterances of the batch change a frame's output and make the result depend on how a batch is split over
  data-parallel ranks; GroupNorm(1) normalises over the whole (padded) time axis; (2) padded frames are
  zeroed before the depthwise conv, which otherwise carries them into the real frames next to them.
With those, padded frames change no real frame's output (tests/speech/test_conformer.py), and with the
rotation switched off (cos 1, sin 0) a block equals torchaudio's `ConformerLayer` whose BatchNorm is
swapped for the per-frame LayerNorm.

Shape legend: B utterances, T 10 ms frames, T' = ⌈T/4⌉ encoder frames, D width, H heads, hd head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchaudio.models.conformer import _FeedForwardModule
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "herd.speech.conformer builds on torchaudio's Conformer pieces: pip install torchaudio"
    ) from e

from herd.speech.conformer_args import ConformerArgs
from herd.text.rope import apply_rope


def frame_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths → (B, max_len) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def stacked_lengths(lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """Encoder frames of utterances of `lengths` 10 ms frames: ⌈length / stack⌉ (a partial last group
    is kept, its missing frames zero)."""
    return torch.div(lengths + stack - 1, stack, rounding_mode="floor")


def stack_frames(features: torch.Tensor, lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """(B, T, F) features → (B, ⌈T/stack⌉, stack·F): frames ≥ length are zeroed first, so what a padded
    frame holds never reaches a real stacked frame (a partial last group sees zeros)."""
    B, T, n = features.shape
    # where, not a product: NaN or inf in the padding must not survive as NaN · 0
    x = torch.where(frame_mask(lengths, T)[..., None], features, 0.0)
    x = F.pad(x, (0, 0, 0, -T % stack))  # (B, T'·stack, F)
    return x.reshape(B, -1, stack * n)  # (B, T', stack·F): frames t·4 .. t·4+3, concatenated in order


def rotary_tables(
    args: ConformerArgs, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE angles for positions 0..length-1, each (length, hd/2) fp32."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary q/k; padded keys masked. Weights laid out as
    `nn.MultiheadAttention`'s (`qkv` = in_proj: q rows, then k, then v; `out` = out_proj), with biases."""

    def __init__(self, args: ConformerArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = args.n_heads, args.head_dim, args.dropout
        self.qkv = nn.Linear(args.dim, 3 * args.dim)
        self.out = nn.Linear(args.dim, args.dim)

    def forward(
        self,
        x: torch.Tensor,  # (B, T', D)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (T', hd/2)
        key_mask: torch.Tensor | None,  # (B, 1, 1, T') bool, True = real key; None: every key is real
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # each (B, T', H, hd)
        q, k = apply_rope(q, k, *rope)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T', hd)
            attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.out(out.transpose(1, 2).reshape(B, T, D))  # (B, T', D)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) tensor: each frame normalised on its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvolutionModule(nn.Module):
    """LayerNorm → pointwise (D → 2D) → GLU → depthwise (k, "same") → LayerNorm → SiLU → pointwise → Dropout;
    padded frames are zeroed before the depthwise conv (see the module docstring)."""

    def __init__(self, args: ConformerArgs) -> None:
        super().__init__()
        d = args.dim
        self.layer_norm = nn.LayerNorm(d, eps=args.norm_eps)
        self.pointwise_in = nn.Conv1d(d, 2 * d, kernel_size=1)
        self.depthwise = nn.Conv1d(d, d, args.conv_kernel, padding=args.conv_kernel // 2, groups=d)
        self.norm = ChannelLayerNorm(d, eps=args.norm_eps)
        self.pointwise_out = nn.Conv1d(d, d, kernel_size=1)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, T', D); mask: (B, T') bool, True = real frame, or None
        h = self.layer_norm(x).transpose(1, 2)  # (B, D, T')
        h = F.glu(self.pointwise_in(h), dim=1)  # (B, D, T')
        if mask is not None:
            h = torch.where(mask[:, None, :], h, 0.0)  # the kernel must not carry padding into real frames
        h = F.silu(self.norm(self.depthwise(h)))
        return self.dropout(self.pointwise_out(h)).transpose(1, 2)  # (B, T', D)


class ConformerBlock(nn.Module):
    """x + ½·FFN(x) → x + MHSA(LN x) → x + Conv(x) → x + ½·FFN(x) → LayerNorm."""

    def __init__(self, args: ConformerArgs) -> None:
        super().__init__()
        d = args.dim
        self.ffn1 = _FeedForwardModule(d, args.ffn_dim, dropout=args.dropout)
        self.attn_norm = nn.LayerNorm(d, eps=args.norm_eps)
        self.attn = RotarySelfAttention(args)
        self.attn_dropout = nn.Dropout(args.dropout)
        self.conv = ConvolutionModule(args)
        self.ffn2 = _FeedForwardModule(d, args.ffn_dim, dropout=args.dropout)
        self.final_norm = nn.LayerNorm(d, eps=args.norm_eps)
        if args.norm_eps != 1e-5:  # torchaudio's feed-forward LayerNorms take the default eps only
            for ffn in (self.ffn1, self.ffn2):
                ffn.sequential[0].eps = args.norm_eps

    def forward(
        self,
        x: torch.Tensor,  # (B, T', D)
        rope: tuple[torch.Tensor, torch.Tensor],  # (T', hd/2) each
        mask: torch.Tensor | None = None,  # (B, T') bool, True = real frame; None: no padding
    ) -> torch.Tensor:
        key_mask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, T')
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), rope, key_mask))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)  # (B, T', D)


class ConformerEncoder(nn.Module):
    """log-mel (B, T, n_mels) + lengths (B,) → (B, ⌈T/stack⌉, dim) encoder frames (see the module docstring).

    Padded frames (t ≥ length) of the input never change a real output frame; the outputs at padded
    encoder frames are not meaningful (use `output_lengths`)."""

    def __init__(self, args: ConformerArgs) -> None:
        super().__init__()
        self.args = args
        self.input_projection = nn.Linear(args.stacked_dim, args.dim)
        self.layers = nn.ModuleList([ConformerBlock(args) for _ in range(args.n_layers)])

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return stacked_lengths(lengths, self.args.stack)

    def init_weights(self) -> None:
        """Every submodule's own `reset_parameters` (PyTorch's defaults: uniform ±1/√fan_in for linear and
        conv layers, ones and zeros for norms); a model built on the meta device needs this after
        `to_empty`."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        features: torch.Tensor,  # (B, T, n_mels)
        lengths: torch.Tensor | None = None,  # (B,) real 10 ms frames per utterance; None: all real
    ) -> torch.Tensor:
        B, T, n = features.shape
        if n != self.args.n_mels:
            raise ValueError(f"features (B, T, {n}): the encoder takes {self.args.n_mels} mel channels")
        if lengths is None:
            lengths = torch.full((B,), T, device=features.device, dtype=torch.long)
        x = stack_frames(features, lengths, self.args.stack)  # (B, T', stack·n_mels)
        x = self.input_projection(x.to(self.input_projection.weight.dtype))  # (B, T', D)
        out_lengths = self.output_lengths(lengths)
        mask = frame_mask(out_lengths, x.shape[1])  # (B, T')
        if bool(mask.all()):
            mask = None  # no padding: the fast path without an attention mask
        rope = rotary_tables(self.args, x.shape[1], x.device)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return x  # (B, T', D)


__all__ = [
    "ChannelLayerNorm",
    "ConformerBlock",
    "ConformerEncoder",
    "ConvolutionModule",
    "RotarySelfAttention",
    "frame_mask",
    "rotary_tables",
    "stack_frames",
    "stacked_lengths",
]
