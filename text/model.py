"""The Llama decoder for every family (Llama 1, 2, 3, 3.1, 3.2): one plain single-device `nn.Module`.

Parameter names are Meta's (`tok_embeddings`, `layers.N.attention.wq`, `feed_forward.w1`, ...), so a
Meta `consolidated.*.pth` loads without renaming; RoPE rotates interleaved pairs as Meta's reference
does (Hugging Face checkpoints are permuted on conversion, see `herd.text.checkpoint_hf`).

No parallelism, no I/O: tensor/context/pipeline parallelism and FSDP are applied from `herd/`.
The layers live in a `ModuleDict` keyed "0".."L-1" so that a pipeline stage can drop layers (and the
embedding / head) and keep the checkpoint's fully-qualified names.

Shape legend: B batch, T query length, S key length (cache + new), D model dim, H query heads,
K kv heads, hd head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.text.args import ModelArgs
from herd.text.kv_cache import KVCache, StaticKVCache
from herd.text.rope import apply_rope, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, as Meta's reference does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, H, T, hd), k/v: (B, K, S, hd), mask: bool (B|1, 1, T, S), True = may attend.
    `causal` without a mask only holds for T == S: SDPA aligns its causal mask top-left, so a single
    decoded token (T=1, S>1) must see every cached key instead.
    """
    is_causal = causal and mask is None and q.shape[2] == k.shape[2]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        ctx: AttentionContext,
        cache: tuple[KVCache, int] | None = None,  # (cache, layer index)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, K, hd)
        q, k = apply_rope(q, k, *ctx.cos_sin)
        if cache is not None:
            kv_cache, layer = cache
            k, v = kv_cache.update(layer, ctx.start_pos, k, v)  # (B, S, K, hd)
        if ctx.kv_gather is not None:  # context parallel: keys/values of the whole sequence
            k, v = ctx.kv_gather(k), ctx.kv_gather(v)  # (B, S, K, hd)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask, causal=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.w1, self.w3):
            nn.init.trunc_normal_(lin.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.w2.weight, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Depth-scaled init of the residual projections (as torchtitan), keeps early loss ~ln(V).
        self._out_std = 0.02 / math.sqrt(2 * (layer_id + 1))

    def forward(self, h: torch.Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> torch.Tensor:
        # h: (B, T, D)
        layer_cache = (cache, self.layer_id) if cache is not None else None
        h = h + self.attention(self.attention_norm(h), ctx, layer_cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(0.02, self._out_std)
        self.feed_forward.init_weights(0.02, self._out_std)


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares."""

    cos_sin: tuple[torch.Tensor, torch.Tensor]  # RoPE tables of the query positions, each (T, hd/2)
    mask: torch.Tensor | None  # bool (B|1, 1, T, S), None → plain causal (T == S) / all keys (T == 1)
    start_pos: int | torch.Tensor = 0  # KV-cache write offset; a long tensor with a `StaticKVCache`
    # Context parallelism: gathers a (B, T_local, ...) tensor along dim 1 into the whole sequence
    # (B, S, ...), differentiably. Set by herd's context-parallel code; the model only calls it.
    kv_gather: Callable[[torch.Tensor], torch.Tensor] | None = None


def causal_document_mask(
    q_pos: torch.Tensor,  # (T,) absolute positions of the queries
    k_pos: torch.Tensor,  # (S,) absolute positions of the keys, in any order
    q_doc: torch.Tensor | None = None,  # (B, T) document ids of the queries
    k_doc: torch.Tensor | None = None,  # (B, S)
) -> torch.Tensor:
    """Bool mask (B|1, 1, T, S): a query sees keys at or before its position, in its own document.

    Works from positions rather than indices, so keys may arrive in any order (context parallelism
    gathers load-balanced chunks: 0, 2c-1, 1, 2c-2, ...).
    """
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, S)
    if q_doc is not None:
        mask = mask & (q_doc[:, :, None] == k_doc[:, None, :])  # (B, T, S)
    return mask[:, None]


def build_attention_mask(
    q_len: int,
    start_pos: int,
    document_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean attention mask (True = may attend), or None when plain causal attention suffices.

    Causal over absolute positions (queries at start_pos..start_pos+T-1, keys at 0..start_pos+T-1);
    with `document_ids` (B, T) a query may only see keys of its own document (packed sequences).
    """
    if document_ids is None:
        if start_pos == 0 or q_len == 1:
            return None  # SDPA's is_causal (no cache) or attend-to-everything (one new token)
        q_pos = torch.arange(start_pos, start_pos + q_len, device=device)
        k_pos = torch.arange(start_pos + q_len, device=device)
        return (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S)
    if start_pos != 0:
        raise ValueError("document_ids cannot be combined with a KV cache offset (start_pos > 0)")
    pos = torch.arange(q_len, device=device)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (causal[None] & same_doc)[:, None]  # (B, 1, T, T)


class Llama(nn.Module):
    """Decoder-only Transformer; `forward` returns logits (B, T, V)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        # Tied models (Llama 3.2 1B/3B) reuse the embedding matrix as the output projection.
        self.output: nn.Linear | None = (
            None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        )
        # RoPE tables are derived state: not saved, recomputed by `init_rope` after materialisation.
        cos, sin = rope_cos_sin(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Set by herd.parallel.context_parallel; None on a single device (see AttentionContext).
        self.kv_gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    # --- materialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_rope(self) -> None:
        """(Re)compute the RoPE tables; after `load_state_dict(assign=True)` on a meta-built model they
        are still meta tensors, so they are rebuilt on the parameters' device."""
        device = self.rope_cos.device
        if self.rope_cos.is_meta:
            device = next((p.device for p in self.parameters() if not p.is_meta), torch.device("cpu"))
        cos, sin = rope_cos_sin(self.args, self.args.max_seq_len, device=device)
        if self.rope_cos.is_meta:
            self.rope_cos, self.rope_sin = cos, sin  # assignment re-registers the (non-persistent) buffers
        else:
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer; call after `to_empty()` on a meta-built model."""
        self.init_rope()
        if self.tok_embeddings is not None:
            # untied: unit-variance embeddings (torchtitan); tied: the matrix is also the head, keep it small
            nn.init.normal_(self.tok_embeddings.weight, std=0.02 if self.args.tie_embeddings else 1.0)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None:
            std = self.args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    # --- pieces reused by composed models (adapters, reward models, pipeline stages) ----------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, D) embeddings."""
        if self.tok_embeddings is None:
            raise RuntimeError("this model (pipeline stage) holds no token embedding")
        return self.tok_embeddings(tokens)

    def rope(self, start_pos: int, length: int, positions: torch.Tensor | None = None):
        """cos/sin tables for positions start_pos..start_pos+length-1, or for explicit `positions` (T,)."""
        if positions is not None:
            if int(positions.max()) >= self.rope_cos.shape[0]:
                raise ValueError(
                    f"position {int(positions.max())} exceeds max_seq_len {self.args.max_seq_len}"
                )
            return self.rope_cos[positions], self.rope_sin[positions]
        end = start_pos + length
        if end > self.rope_cos.shape[0]:
            raise ValueError(f"position {end} exceeds max_seq_len {self.args.max_seq_len}")
        return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection: (B, T, D) → (B, T, V)."""
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            return self.output(h)
        if self.tok_embeddings is None:
            return h  # a middle pipeline stage: hidden states pass through
        return F.linear(h, self.tok_embeddings.weight)

    def forward_hidden(
        self,
        tokens: torch.Tensor | None = None,
        input_embeds: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Everything but the head: returns the last layer's hidden states (B, T, D), before the norm."""
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of `tokens` (B, T) or `input_embeds` (B, T, D)")
        h = self.embed(tokens) if input_embeds is None else input_embeds
        # the length comes from the input, not from h: under sequence parallelism the embedding's
        # output is already split along the sequence
        length = tokens.shape[1] if tokens is not None else input_embeds.shape[1]
        ctx = self.attention_context(length, start_pos, document_ids, positions, h.device, kv_cache)
        for layer in self.layers.values():
            h = layer(h, ctx, kv_cache)
        return h

    def attention_context(
        self,
        length: int,
        start_pos: int = 0,
        document_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        device: torch.device | None = None,
        kv_cache: KVCache | None = None,
    ) -> AttentionContext:
        """RoPE tables and mask for `length` query tokens (shared by composed models' extra layers)."""
        device = device or self.rope_cos.device
        if getattr(kv_cache, "static", False):
            return self._static_context(length, start_pos, kv_cache.max_seq_len, document_ids, positions)
        kv_gather = self.kv_gather
        if positions is None and kv_gather is None:
            mask = build_attention_mask(length, start_pos, document_ids, device)
            return AttentionContext(self.rope(start_pos, length), mask, start_pos)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + length, device=device)
        k_pos, k_doc = positions, document_ids
        if kv_gather is not None:  # the keys are the whole sequence; their positions/docs are gathered too
            k_pos = kv_gather(positions[None])[0]
            k_doc = kv_gather(document_ids) if document_ids is not None else None
        mask = causal_document_mask(positions, k_pos, document_ids, k_doc)
        return AttentionContext(self.rope(start_pos, length, positions), mask, start_pos, kv_gather)

    def _static_context(
        self,
        length: int,
        start_pos: int | torch.Tensor,
        max_seq_len: int,
        document_ids: torch.Tensor | None,
        positions: torch.Tensor | None,
    ) -> AttentionContext:
        """A `StaticKVCache` returns all S_max keys: mask the ones after each query (and the unwritten
        zeros) by position. No Python int depends on `start_pos`, so one compiled step serves every
        position; the positions are not range-checked here (the decode loop sizes the cache)."""
        if document_ids is not None or positions is not None or self.kv_gather is not None:
            raise ValueError("a static KV cache decodes one plain sequence per row (no documents, no CP)")
        if isinstance(start_pos, int) and start_pos == 0:  # prefill: the cache returns only these keys
            return AttentionContext(self.rope(0, length), None, 0)
        device = self.rope_cos.device
        q_pos = start_pos + torch.arange(length, device=device)  # (T,)
        k_pos = torch.arange(max_seq_len, device=device)  # (S_max,)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, S_max)
        return AttentionContext((self.rope_cos[q_pos], self.rope_sin[q_pos]), mask, start_pos)

    def forward(
        self,
        tokens: torch.Tensor | None = None,  # (B, T) int
        input_embeds: torch.Tensor | None = None,  # (B, T, D), for adapters that feed embeddings
        document_ids: torch.Tensor | None = None,  # (B, T) int, packed-sequence document mask
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,  # (T,) absolute positions (context parallelism)
    ) -> torch.Tensor:
        h = self.forward_hidden(tokens, input_embeds, document_ids, kv_cache, start_pos, positions)
        return self.head(h)  # (B, T, V)

    def new_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        cache_cls: type[KVCache] = KVCache,  # composed models pass a subclass that also holds image K/V
        static: bool = False,  # a `StaticKVCache` (fixed shapes for a compiled step) unless cache_cls is one
    ) -> KVCache:
        ref = next(self.parameters())
        if static and not issubclass(cache_cls, StaticKVCache):
            if cache_cls is not KVCache:
                raise ValueError(f"no static variant of {cache_cls.__name__}: pass one as cache_cls")
            cache_cls = StaticKVCache
        return cache_cls(
            n_layers=self.args.n_layers,
            batch_size=batch_size,
            max_seq_len=max_seq_len or self.args.max_seq_len,
            n_kv_heads=self.args.n_kv_heads,
            head_dim=self.args.head_dim,
            dtype=dtype or ref.dtype,
            device=ref.device,
        )


def build_llama(
    args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Llama:
    """Build on the meta device, materialise on `device` and initialise (the path FSDP also takes)."""
    with torch.device("meta"):
        model = Llama(args)
    model.to_empty(device=device)
    model.init_weights()
    if dtype is not None:
        model.to(dtype)
    return model
