"""The speech adapter (paper §8.1.2): speech-encoder frames → embeddings in the frozen LLM's input sequence.

    encoder frames (B, T', E), lengths (B,)           40 ms frames of the Conformer (E = 1536)
      → padded frames zeroed
      → Conv1d E → D, kernel 3, stride 2, padding 1    (B, ⌈T'/2⌉, D): 80 ms frames
      → one pre-norm Transformer layer: RMSNorm → rotary self-attention (padded keys masked) →
        RMSNorm → SwiGLU FFN                          (B, T'', D), D = 3072, FFN 4096
      → RMSNorm → Linear D → LLM dim                  (B, T'', D_llm)

`splice_audio` then puts each clip's T''_i real embeddings where its audio placeholder token stands in the
prompt (the paper: the adapter's outputs are "directly fed into the language model as token
embeddings"); the LLM takes the result as `input_embeds` and stays frozen.

Sizes: the paper gives ~100M parameters and the pieces above; at D_llm = 4096 (Llama 3 8B) the count is
102,248,448 (`SpeechAdapterArgs.num_params`, equal to the built module). The paper names neither the
norm, the FFN's kind nor the head count: we take the LLM's own choices (RMSNorm, SwiGLU, head width 128,
RoPE θ 10,000 over the adapter's 80 ms frames), reusing `herd.text`'s RMSNorm, FeedForward and rotation.

Padding never changes a real output: the conv reads zeros past an utterance's end, exactly the zero
padding it uses for an utterance alone (tests/adapters/test_speech_adapter.py checks 1e-5).

Shape legend: B clips, T' encoder frames, T'' adapter frames, E encoder width, D adapter width, H heads,
hd head width, S prompt tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.text.model import FeedForward, RMSNorm
from herd.text.rope import apply_rope


@dataclass
class SpeechAdapterArgs:
    encoder_dim: int = 1536  # the speech encoder's width (speech_1b)
    dim: int = 3072
    n_heads: int = 24  # head width 128, as the LLM's
    ffn_dim: int = 4096
    llm_dim: int = 4096  # Llama 3 8B's embedding size
    conv_kernel: int = 3
    conv_stride: int = 2  # 40 ms encoder frames → 80 ms
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"adapter dim {self.dim} must split into {self.n_heads} heads of even width")
        if self.conv_kernel % 2 == 0 or self.conv_stride < 1:
            raise ValueError(
                f"conv_kernel must be odd and conv_stride ≥ 1, got {self.conv_kernel}, {self.conv_stride}"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of `SpeechAdapter(self)` (it has no embedding; the flag is the loop's API)."""
        e, d, f, k = self.encoder_dim, self.dim, self.ffn_dim, self.conv_kernel
        conv = e * d * k + d
        layer = 2 * d + 4 * d * d + 3 * d * f  # two RMSNorms, q/k/v/o, SwiGLU (no biases)
        return conv + layer + d + d * self.llm_dim  # + the output norm and projection (no bias)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS: dict[str, Any] = {
    # Llama 3 §8.1.2: "a convolution layer, a rotary Transformer layer, and a linear layer ... kernel size
    # 3 and stride 2 ... latent dimension 3072 ... feed-forward network with a dimension of 4096"
    "speech_adapter_8b": lambda: SpeechAdapterArgs(),
    # the tiny encoder (width 64) into a tiny LLM (width 64)
    "tiny": lambda: SpeechAdapterArgs(encoder_dim=64, dim=64, n_heads=4, ffn_dim=128, llm_dim=64),
}
SPEECH_ADAPTER_PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_speech_adapter_preset(name: str, **overrides: Any) -> SpeechAdapterArgs:
    """A named adapter architecture with fields replaced (`get_speech_adapter_preset("tiny", llm_dim=128)`)."""
    if name not in _PRESETS:
        raise KeyError(
            f"unknown speech adapter preset {name!r}; known: {', '.join(SPEECH_ADAPTER_PRESET_NAMES)}"
        )
    args = _PRESETS[name]()
    return dataclasses.replace(args, **overrides) if overrides else args


class AdapterAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary q/k over the adapter's frames; padded keys masked."""

    def __init__(self, args: SpeechAdapterArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(args.dim, args.dim, bias=False) for _ in range(4))

    def forward(
        self,
        x: torch.Tensor,  # (B, T'', D)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin (T'', hd/2)
        key_mask: torch.Tensor | None,  # (B, 1, 1, T'') True = real frame
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, k, *rope)  # (B, T'', H, hd)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask)  # fmt: skip
        return self.wo(out.transpose(1, 2).reshape(B, T, D))  # (B, T'', D)


class SpeechAdapter(nn.Module):
    """Speech-encoder frames (B, T', E) + lengths (B,) → LLM input embeddings (B, T'', D_llm), with
    T'' = ⌈T'/2⌉ (`output_lengths`); outputs at padded frames are zero."""

    def __init__(self, args: SpeechAdapterArgs) -> None:
        super().__init__()
        self.args = args
        self.conv = nn.Conv1d(args.encoder_dim, args.dim, args.conv_kernel, stride=args.conv_stride,
                              padding=args.conv_kernel // 2)  # fmt: skip
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = AdapterAttention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.llm_dim, bias=False)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Adapter frames of clips of `lengths` encoder frames: the conv's ⌊(L + 2·(k//2) − k) / s⌋ + 1."""
        a = self.args
        out = (
            torch.div(
                lengths + 2 * (a.conv_kernel // 2) - a.conv_kernel, a.conv_stride, rounding_mode="floor"
            )
            + 1
        )
        return out.clamp_min(0) * (lengths > 0)

    def init_weights(self) -> None:
        """PyTorch's defaults for the conv; the LLM's truncated-normal init (std 0.02) for the rest."""
        self.conv.reset_parameters()
        for norm in (self.attention_norm, self.ffn_norm, self.norm):
            norm.reset_parameters()
        for lin in (self.attention.wq, self.attention.wk, self.attention.wv, self.attention.wo, self.output):
            nn.init.trunc_normal_(lin.weight, std=0.02, a=-0.06, b=0.06)
        self.feed_forward.init_weights(0.02, 0.02)

    def forward(
        self,
        frames: torch.Tensor,  # (B, T', E) speech-encoder output
        lengths: torch.Tensor | None = None,  # (B,) real encoder frames; None: all real
    ) -> torch.Tensor:
        B, T, E = frames.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=frames.device)
        real = torch.arange(T, device=frames.device)[None, :] < lengths[:, None]  # (B, T')
        # where, not a product: NaN or inf in the padding must not survive as NaN · 0
        x = torch.where(real[..., None], frames, 0.0).transpose(1, 2)  # (B, E, T'): padding → 0
        h = self.conv(x.to(self.conv.weight.dtype)).transpose(1, 2)  # (B, T'', D)
        out_len = self.output_lengths(lengths)
        mask = torch.arange(h.shape[1], device=h.device)[None, :] < out_len[:, None]  # (B, T'')
        # a clip of no frames keeps its keys: a row with every key masked would make NaN in attention
        keys = mask | ~mask.any(1, keepdim=True)
        key_mask = None if bool(keys.all()) else keys[:, None, None, :]
        hd = self.args.head_dim
        inv_freq = 1.0 / (self.args.rope_theta ** (torch.arange(0, hd, 2, device=h.device).float() / hd))
        angles = torch.outer(torch.arange(h.shape[1], device=h.device, dtype=torch.float32), inv_freq)
        h = h + self.attention(self.attention_norm(h), (angles.cos(), angles.sin()), key_mask)
        h = h + self.feed_forward(self.ffn_norm(h))
        return torch.where(mask[..., None], self.output(self.norm(h)), 0.0)  # (B, T'', D_llm)


@dataclass
class SplicedInputs:
    """The LLM's input with audio spliced in."""

    embeds: torch.Tensor  # (B, S', D) right-padded with zeros
    lengths: torch.Tensor  # (B,) real positions per row
    token_index: torch.Tensor  # (B, S') long: the prompt position each embedding came from; −1 for audio
    # frames and padding (gather labels with it: audio frames carry none)


def splice_audio(
    token_embeds: torch.Tensor,  # (B, S, D) the LLM's embeddings of the prompt tokens
    tokens: torch.Tensor,  # (B, S) token ids
    audio_embeds: torch.Tensor,  # (N, T'', D) adapter outputs, one row per clip
    audio_lengths: torch.Tensor,  # (N,) real frames per clip
    audio_token_id: int,
    token_lengths: torch.Tensor | None = None,  # (B,) real tokens per row (right padding); None: all
) -> SplicedInputs:
    """Replace each audio placeholder token by its clip's real frames (clips in row-major order of the
    placeholders: the k-th placeholder of the batch takes clip k). Differentiable in `audio_embeds`."""
    B, S, D = token_embeds.shape
    if token_lengths is None:
        token_lengths = torch.full((B,), S, dtype=torch.long)
    token_lengths = token_lengths.tolist()
    placeholders = sum(int((tokens[b, : token_lengths[b]] == audio_token_id).sum()) for b in range(B))
    if placeholders != audio_embeds.shape[0]:
        raise ValueError(
            f"{placeholders} audio placeholder token(s) (id {audio_token_id}) but {audio_embeds.shape[0]} clip(s)"
        )
    if audio_embeds.shape[-1] != D:
        raise ValueError(f"audio embeddings are {audio_embeds.shape[-1]}-dim, the LLM's are {D}-dim")
    rows, indices, clip = [], [], 0
    for b in range(B):
        pieces, index, start = [], [], 0
        positions = (tokens[b, : token_lengths[b]] == audio_token_id).nonzero().flatten().tolist()
        for p in [*positions, token_lengths[b]]:
            pieces.append(token_embeds[b, start:p])  # the text before the placeholder
            index.append(torch.arange(start, p))
            if p < token_lengths[b]:  # a placeholder: its clip's real frames
                n = int(audio_lengths[clip])
                pieces.append(audio_embeds[clip, :n].to(token_embeds.dtype))
                index.append(torch.full((n,), -1))
                clip += 1
            start = p + 1
        rows.append(torch.cat(pieces))  # (S'_b, D)
        indices.append(torch.cat(index))
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.long)
    width = int(lengths.max()) if B else 0
    embeds = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])  # (B, S', D)
    token_index = torch.stack([F.pad(i, (0, width - i.numel()), value=-1) for i in indices])  # (B, S')
    return SplicedInputs(embeds, lengths.to(token_embeds.device), token_index.to(token_embeds.device))


__all__ = [
    "SPEECH_ADAPTER_PRESET_NAMES",
    "AdapterAttention",
    "SpeechAdapter",
    "SpeechAdapterArgs",
    "SplicedInputs",
    "get_speech_adapter_preset",
    "splice_audio",
]
