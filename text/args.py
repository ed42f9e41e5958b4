"""Architecture arguments of the Llama family and the named presets.

"args" describe the architecture (torchtitan's naming); the job's config lives in `herd.config`.
The FFN width follows Meta's rounding exactly, so that every published checkpoint's shapes come out
of (dim, multiple_of, ffn_dim_multiplier) without a table of hidden sizes.
"""

from __future__ import annotations

import dataclasses
import math
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
        """Build from a Meta `params.json` dict, merged with herd's `herd_params.json` when there is one.

        Reads Meta's keys (`use_scaled_rope`, `rope_scaling_factor`, `vocab_size` -1, no `rope_theta`) and the
        keys older herd files wrote into params.json itself (`max_seq_len`, `ffn_dim`, `rope_scaling`,
        `tie_embeddings`). A missing `max_seq_len` is the context of the release the keys describe (see
        `meta_max_seq_len`), so Meta's own files load with the same args as their Hugging Face configs.
        """
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
            # `rope_scaling_factor` (and the full table in herd_params.json when it is not the default).
            kwargs["rope_scaling"] = RopeScaling(factor=p.get("rope_scaling_factor", 8.0))
        if "tie_embeddings" not in p and "tie_word_embeddings" in p:
            kwargs["tie_embeddings"] = bool(p["tie_word_embeddings"])
        if "max_seq_len" not in kwargs:
            kwargs["max_seq_len"] = meta_max_seq_len(p)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_meta_params(self) -> dict[str, Any]:
        """params.json with only the keys Meta's files use, so that llama-models' loader
        (`ModelArgs(max_seq_len=..., max_batch_size=..., **params)`) accepts it and builds the same shapes.

        The FFN width is written as the (multiple_of, ffn_dim_multiplier) pair that Meta's formula turns
        into it (`meta_ffn_params`). What Meta's keys cannot say lives in `to_herd_params`.
        """
        multiple_of, multiplier = self.multiple_of, self.ffn_dim_multiplier
        if self.ffn_dim is not None:
            multiple_of, multiplier = meta_ffn_params(self.dim, self.ffn_dim)
        p: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": multiple_of,
        }
        if multiplier is not None:  # Meta's Llama 2 7B/13B files leave the key out rather than write null
            p["ffn_dim_multiplier"] = multiplier
        p.update(norm_eps=self.norm_eps, rope_theta=self.rope_theta)
        p["use_scaled_rope"] = self.rope_scaling is not None
        if self.rope_scaling is not None:
            # Llama 3's reference code ignores this key (it hard-codes factor 8); Llama 4's reads it.
            p["rope_scaling_factor"] = self.rope_scaling.factor
        return p

    def to_herd_params(self) -> dict[str, Any]:
        """What params.json cannot carry, for herd's `herd_params.json` beside it: the context length
        (Meta passes it at load time), the tie flag and a RoPE scaling table other than Meta's fixed one."""
        p: dict[str, Any] = {"max_seq_len": self.max_seq_len, "tie_embeddings": self.tie_embeddings}
        s = self.rope_scaling
        if s is not None and s != RopeScaling(s.factor):  # Meta's code fixes low/high 1/4, original 8192
            p["rope_scaling"] = dataclasses.asdict(s)
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# (multiple_of, ffn_dim_multiplier) of Meta's published models, tried first so that a converted checkpoint's
# params.json reads like Meta's own. Several pairs give the same width for some dims; the order makes each
# release's dim find its own pair first: Llama 2 7B/13B (256, -), Llama 3.2 1B (256, 1.5) and 3B (256, 1.0),
# Llama 2/3 70B (4096, 1.3), Llama 3 8B (1024, 1.3), Llama 3.1 405B (4096, 1.2).
PUBLISHED_FFN_RULES: tuple[tuple[int, float | None], ...] = (
    (256, None),
    (256, 1.5),
    (256, 1.0),
    (4096, 1.3),
    (1024, 1.3),
    (4096, 1.2),
)


def meta_ffn_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's reference `FeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)` builds."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, width: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives exactly `width` rows.

    Preference: a published pair; then no multiplier and the largest power-of-two `multiple_of` dividing
    `width`; then the multiplier with the fewest decimals (its float is what JSON writes and Meta reads
    back, so the check below is the one Meta's code will do).
    """
    if width < 1 or dim < 1:
        raise ValueError(f"FFN width {width} / dim {dim}: both must be positive")
    for multiple_of, multiplier in PUBLISHED_FFN_RULES:
        if meta_ffn_width(dim, multiple_of, multiplier) == width:
            return multiple_of, multiplier
    powers = [1 << k for k in range(width.bit_length()) if width % (1 << k) == 0][::-1]
    for multiple_of in powers:
        if meta_ffn_width(dim, multiple_of, None) == width:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    for digits in range(1, 8):
        scale = 10**digits
        for multiple_of in powers:
            # int(multiplier * base) must land in (width - multiple_of, width]; try the decimals around the
            # lower end, float rounding decides which of them does.
            first = math.floor((width - multiple_of + 1) / base * scale)
            for k in range(max(first - 1, 1), first + 3):
                if meta_ffn_width(dim, multiple_of, k / scale) == width:
                    return multiple_of, k / scale
    raise ValueError(
        f"no (multiple_of, ffn_dim_multiplier) makes Meta's FFN formula give {width} rows for dim {dim}; "
        "this checkpoint cannot be written as a Meta params.json"
    )


def meta_max_seq_len(params: dict[str, Any]) -> int:
    """Context length of the Meta release a params.json without `max_seq_len` describes (Meta passes it at
    load time): 131,072 for Llama 3.1/3.2 (scaled RoPE), 4,096 for Llama 2, 2,048 for Llama 1 (no
    rope_theta; eps 1e-6), 8,192 otherwise (Llama 3) — the values of the matching Hugging Face configs."""
    if params.get("use_scaled_rope") or isinstance(params.get("rope_scaling"), dict):
        return 131_072
    if "rope_theta" not in params:
        return 2048 if params.get("norm_eps") == 1e-6 else 4096
    return 8192


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


__all__ = [
    "PRESET_NAMES",
    "PUBLISHED_FFN_RULES",
    "ModelArgs",
    "RopeScaling",
    "get_preset",
    "meta_ffn_params",
    "meta_ffn_width",
    "meta_max_seq_len",
]
