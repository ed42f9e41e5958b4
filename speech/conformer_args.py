"""Architecture arguments of the speech encoder (paper §8.1.1) and its named presets.

The encoder is the paper's Conformer: 80-dim log-mel frames (10 ms hop) are stacked by 4 and linearly
projected to `dim` (40 ms frames), then `n_layers` Conformer blocks run over them, each

    x + ½·FFN(x)  →  x + RotaryMHSA(LN x)  →  x + Conv(x)  →  x + ½·FFN(x)  →  LayerNorm

with two Macaron feed-forwards of width `ffn_dim`, a convolution module whose depthwise kernel is
`conv_kernel` wide, and self-attention with rotary position embeddings over `n_heads` heads.

`speech_1b` is the paper's: 24 layers, d 1536, FFN 4096, kernel 7, 24 heads; `num_params()` counts the
built module exactly: 1,002,100,224 parameters (`ConformerEncoder(get_speech_preset("speech_1b"))`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ConformerArgs:
    n_mels: int = 80  # log-mel channels per 10 ms frame
    stack: int = 4  # consecutive frames stacked into one encoder frame (4 × 10 ms = 40 ms)
    dim: int = 1536
    n_layers: int = 24
    n_heads: int = 24
    ffn_dim: int = 4096  # each of the two Macaron feed-forwards
    conv_kernel: int = 7  # depthwise convolution ("same" padding, so odd)
    rope_theta: float = 10000.0  # the paper gives none; RoFormer's
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"speech encoder dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary attention needs an even head dim, got {self.head_dim}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd ('same' padding), got {self.conv_kernel}")
        if self.stack < 1 or self.n_mels < 1 or self.n_layers < 1:
            raise ValueError(
                f"stack, n_mels and n_layers must be ≥ 1, got {self.stack}, {self.n_mels}, {self.n_layers}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def stacked_dim(self) -> int:
        """Width of one stacked input frame: 4 × 80 = 320."""
        return self.stack * self.n_mels

    def block_params(self) -> int:
        """Exact parameter count of one `ConformerBlock`."""
        d, f, k = self.dim, self.ffn_dim, self.conv_kernel
        ffn = 2 * d + (d * f + f) + (f * d + d)  # LayerNorm, Linear d→f, Linear f→d (all with biases)
        attention = 2 * d + (3 * d * d + 3 * d) + (d * d + d)  # LayerNorm, qkv, output projection
        conv = 2 * d + (2 * d * d + 2 * d) + (k * d + d) + 2 * d + (d * d + d)  # LN, pw→GLU, dw, LN, pw
        return 2 * ffn + attention + conv + 2 * d  # + the block's final LayerNorm

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of `ConformerEncoder(self)`; `include_embedding` adds the input projection
        (stacked frames → dim), the encoder's only "embedding"."""
        projection = self.stacked_dim * self.dim + self.dim
        return self.n_layers * self.block_params() + (projection if include_embedding else 0)

    def flops_per_frame(self, frames: int) -> float:
        """Training FLOPs (forward + backward) per encoder frame of a `frames`-frame utterance: 6 per
        weight (matmuls; norms and the depthwise conv are included, they are small) plus the attention
        scores and their weighted sum, 12·layers·dim·frames."""
        return 6.0 * self.num_params() + 12.0 * self.n_layers * self.dim * frames

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS: dict[str, Any] = {
    # Llama 3 §8.1.1: "24 Conformer layers ... latent dimension 1536 ... two Macron-net style
    # feed-forward networks with dimension 4096 ... convolution module with kernel size 7 ... rotary
    # attention module with 24 attention heads" (~1B parameters).
    "speech_1b": lambda: ConformerArgs(),
    # Small enough for CPU tests: 2 blocks of width 64.
    "tiny": lambda: ConformerArgs(dim=64, n_layers=2, n_heads=4, ffn_dim=128, conv_kernel=7),
}

SPEECH_PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_speech_preset(name: str, **overrides: Any) -> ConformerArgs:
    """A named encoder architecture, optionally with fields replaced (`get_speech_preset("tiny", dim=32)`)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown speech preset {name!r}; known presets: {', '.join(SPEECH_PRESET_NAMES)}")
    args = _PRESETS[name]()
    return dataclasses.replace(args, **overrides) if overrides else args


__all__ = ["SPEECH_PRESET_NAMES", "ConformerArgs", "get_speech_preset"]
