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
