"""Pre-allocated key/value cache for incremental decoding.

One (L, B, S_max, K, hd) buffer each for keys and values. A prompt's cache can be copied across the
rows of a larger batch (`expand_rows`) so that K samples of one prompt share its prefill — the
rejection-sampling path of post-training uses this.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layers, batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, S_max, K, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, T, K, hd) at start_pos; return all keys/values so far (B, start_pos+T, K, hd)."""
        B, T = k.shape[:2]
        end = start_pos + T
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {end} > capacity {self.max_seq_len}")
        if self.batch_size != B:
            raise ValueError(f"batch of {B} rows does not match the cache's {self.batch_size}")
        self.k[layer, :, start_pos:end] = k
        self.v[layer, :, start_pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def expand_rows(self, repeats: int, length: int) -> KVCache:
        """A new cache whose row b·repeats + r copies row b's first `length` positions (shared prefill)."""
        out = KVCache.__new__(KVCache)
        out.max_seq_len = self.max_seq_len
        shape = list(self.k.shape)
        shape[1] *= repeats
        out.k = torch.zeros(shape, dtype=self.k.dtype, device=self.k.device)
        out.v = torch.zeros_like(out.k)
        out.k[:, :, :length] = self.k[:, :, :length].repeat_interleave(repeats, dim=1)
        out.v[:, :, :length] = self.v[:, :, :length].repeat_interleave(repeats, dim=1)
        return out


class StaticKVCache(KVCache):
    """Per-layer buffers read whole: `update` writes at positions given as a tensor and returns all S_max
    positions, so every decode step has the same shapes (what a compiled step, and a CUDA graph, need).

    One (B, S_max, K, hd) tensor per layer (gpt-fast's and transformers' layout), not views of one
    (L, ...) tensor: a compiled step that writes into a view of a shared input copies the whole input
    back (functionalisation), which made every layer's write cost the whole cache (measured 5× slower
    decoding at batch 64 on a CPU).

    Positions not written yet hold zeros; the model masks them out (`Llama.attention_context` builds a
    (1, 1, T, S_max) mask from the positions when it sees `static`). `start_pos` may be an int or a long
    tensor (0-dim or (1,)): a tensor keeps the step free of Python ints that a compiled graph would
    specialise on (gpt-fast's `input_pos`). Rows are not expanded (`expand_rows`): shared-prefix
    sampling uses the dynamic cache."""

    static = True

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_seq_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k_layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v_layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len

    @property
    def batch_size(self) -> int:
        return self.k_layers[0].shape[0]

    def update(
        self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, T, K, hd) at start_pos..start_pos+T-1; return all keys/values (B, S_max, K, hd),
        or (the prefill, start_pos the int 0) the written ones (B, T, K, hd)."""
        # an int position (eager callers) is checked as the dynamic cache does; a tensor one is not
        if isinstance(start_pos, int) and start_pos + k.shape[1] > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {start_pos + k.shape[1]} > {self.max_seq_len}")
        if self.batch_size != k.shape[0]:
            raise ValueError(f"batch of {k.shape[0]} rows does not match the cache's {self.batch_size}")
        pos = start_pos + torch.arange(k.shape[1], device=k.device)  # (T,)
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]
        k_all.index_copy_(1, pos, k.to(k_all.dtype))
        v_all.index_copy_(1, pos, v.to(v_all.dtype))
        if isinstance(start_pos, int) and start_pos == 0:
            return k, v  # a prefill from 0 sees only its own keys: plain causal attention over T, not S_max
        return k_all, v_all

    def expand_rows(self, repeats: int, length: int) -> KVCache:
        raise NotImplementedError("a static cache is not expanded: prefill_shared uses the dynamic KVCache")
