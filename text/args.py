"""Architecture arguments of the Llama family and the named presets.

"args" describe the architecture (torchtitan's naming); the job's config lives in `herd.config`.
The FFN width follows Meta's rounding exactly, so that every published checkpoint's shapes come out
of (dim, multiple_of, ffn_dim_multiplier) without a table of hidden sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (long-context extension, paper §3.4.2)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None → multi-head attention (n_kv_heads = n_heads)
    vocab_size: int = 128_256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_dim: int | None = None  # explicit FFN width (Hugging Face configs); overrides the rounding rule
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4·dim, scaled by ffn_dim_multiplier, rounded up to multiple_of (Meta)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of `Llama(self)`."""
        d, hd, kv = self.dim, self.head_dim, self.n_kv_heads
        attn = d * (self.n_heads * hd) * 2 + d * (kv * hd) * 2
        ffn = 3 * d * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        total = self.n_layers * per_layer + d + out
        return total + (emb if include_embedding else 0)

    def training_flops_per_token(self, seq_len: int) -> float:
        """6·N (dense matmuls, forward + backward) + 12·L·D·T (causal attention scores and values), as in
        the PaLM/torchtitan accounting; embeddings are a lookup, not a matmul, and are excluded."""
        n_matmul = self.num_params(include_embedding=False)
        if self.tie_embeddings:  # the head reuses the embedding matrix: it is a matmul all the same
            n_matmul += self.vocab_size * self.dim
        return 6 * n_matmul + 12 * self.n_layers * self.dim * seq_len

    # --- Meta params.json -------------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Build from a Meta `params.json` dict (unknown keys such as `use_scaled_rope` are mapped)."""
        p = dict(params)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in p and p[f.name] is not None:
                kwargs[f.name] = p[f.name]
        if p.get("vocab_size", -1) == -1:  # Llama 1/2 params.json store -1 and take it from the tokenizer
            kwargs["vocab_size"] = overrides.pop("vocab_size", 32_000)
        if "rope_theta" not in p:  # Llama 1/2 params.json predate the field; their base was 10,000
            kwargs["rope_theta"] = 10_000.0
        if p.get("use_scaled_rope") and not isinstance(p.get("rope_scaling"), dict):
            # Meta's reference code hard-codes factor 8 (its 3.2 params.json carry no factor); herd writes
            # `rope_scaling_factor` (and the full `rope_scaling` table when it is not the default) explicitly.
            kwargs["rope_scaling"] = RopeScaling(factor=p.get("rope_scaling_factor", 8.0))
        if "tie_embeddings" not in p and "tie_word_embeddings" in p:
            kwargs["tie_embeddings"] = bool(p["tie_word_embeddings"])
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_meta_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.ffn_dim is not None:
            p["ffn_dim"] = self.ffn_dim
        if self.rope_scaling is not None:
            s = self.rope_scaling
            p["use_scaled_rope"] = True
            p["rope_scaling_factor"] = s.factor
            if (s.low_freq_factor, s.high_freq_factor, s.original_max_position) != (1.0, 4.0, 8192):
                p["rope_scaling"] = dataclasses.asdict(s)
        if self.tie_embeddings:
            p["tie_embeddings"] = True
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _llama1(dim: int, n_layers: int, n_heads: int) -> ModelArgs:
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        vocab_size=32_000,
        multiple_of=256,
        norm_eps=1e-6,
        rope_theta=10_000.0,
        max_seq_len=2048,
    )


def _llama2(dim: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None, **kw: Any) -> ModelArgs:
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=32_000,
        multiple_of=kw.pop("multiple_of", 256),
        norm_eps=1e-5,
        rope_theta=10_000.0,
        max_seq_len=4096,
        **kw,
    )


def _llama3(dim: int, n_layers: int, n_heads: int, multiple_of: int, mult: float, **kw: Any) -> ModelArgs:
    return ModelArgs(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=8,
        vocab_size=128_256,
        multiple_of=multiple_of,
        ffn_dim_multiplier=mult,
        norm_eps=1e-5,
        rope_theta=500_000.0,
        max_seq_len=kw.pop("max_seq_len", 8192),
        **kw,
    )


_PRESETS: dict[str, Any] = {
    "llama1_7b": lambda: _llama1(4096, 32, 32),
    "llama1_13b": lambda: _llama1(5120, 40, 40),
    "llama1_33b": lambda: _llama1(6656, 60, 52),
    "llama1_65b": lambda: _llama1(8192, 80, 64),
    "llama2_7b": lambda: _llama2(4096, 32, 32),
    "llama2_13b": lambda: _llama2(5120, 40, 40),
    "llama2_70b": lambda: _llama2(8192, 80, 64, 8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3_8b": lambda: _llama3(4096, 32, 32, 1024, 1.3),
    "llama3_70b": lambda: _llama3(8192, 80, 64, 4096, 1.3),
    "llama3_1_8b": lambda: _llama3(
        4096, 32, 32, 1024, 1.3, rope_scaling=RopeScaling(8.0), max_seq_len=131_072
    ),
    "llama3_1_70b": lambda: _llama3(
        8192, 80, 64, 4096, 1.3, rope_scaling=RopeScaling(8.0), max_seq_len=131_072
    ),
    "llama3_1_405b": lambda: _llama3(
        16_384, 126, 128, 4096, 1.2, rope_scaling=RopeScaling(8.0), max_seq_len=131_072
    ),
    "llama3_2_1b": lambda: _llama3(
        2048, 16, 32, 256, 1.5, rope_scaling=RopeScaling(32.0), tie_embeddings=True, max_seq_len=131_072
    ),
    "llama3_2_3b": lambda: _llama3(
        3072, 28, 24, 256, 1.0, rope_scaling=RopeScaling(32.0), tie_embeddings=True, max_seq_len=131_072
    ),
    # `tiny`: the real Llama 3 vocabulary on a model small enough to train on 2 CPU cores in minutes.
    "tiny": lambda: ModelArgs(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=128_256,
        multiple_of=32,
        rope_theta=500_000.0,
        max_seq_len=512,
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelArgs:
    """A named architecture, optionally with fields replaced (`get_preset("tiny", vocab_size=512)`)."""
    if name not in _PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    args = _PRESETS[name]()
    return dataclasses.replace(args, **overrides) if overrides else args


__all__ = ["ModelArgs", "RopeScaling", "get_preset", "PRESET_NAMES"]
