"""Compiled static-cache decoding (gpt-fast's recipe) for the one decode loop, `herd.text.generation.decode`.

    from herd.fast_decode import compiled_steps
    generate(model, prompts, params, steps=compiled_steps(model))

The loop is unchanged; `DecodeSteps` says how it runs the model:

- the KV cache is a `StaticKVCache` (preallocated, read whole, later positions masked), so every decode
  step sees the same shapes and its position arrives as a 0-dim tensor, not a Python int;
- `decode_one_token` is compiled once with static shapes: on a GPU with mode "reduce-overhead" (CUDA
  graphs: one graph replay per token, no per-kernel launch cost), on a CPU with the default mode;
- `prefill` is compiled separately with dynamic shapes (prompt lengths and batch sizes vary);
- the cache capacity is rounded up to a multiple of `bucket` positions, so calls with nearby lengths
  reuse one compiled step; for a plain `Llama` the cache of a (rows, capacity) pair is kept and
  reused, so a CUDA graph keeps reading the same addresses across calls (composed models bind images
  into a new cache per call).

Compiling is applied here, in herd/: the model code only accepts tensor positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from herd.text.generation import DecodeSteps, decode_one_token, prefill
from herd.text.model import Llama


def default_mode(device: torch.device) -> str:
    """CUDA graphs on a GPU; inductor's default on a CPU (CUDA graphs do not exist there)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def _capacity(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket


class CompiledSteps:
    """Compiled prefill and decode steps of one model, and its static caches (built by `compiled_steps`)."""

    def __init__(self, model: nn.Module, mode: str | None, bucket: int, backend: str) -> None:
        device = next(model.parameters()).device
        self.mode = mode or default_mode(device)
        self.bucket = bucket
        self.cuda = device.type == "cuda"
        compile_kw: dict[str, Any] = {"backend": backend}
        if backend == "inductor":
            compile_kw["mode"] = self.mode
        self._decode = torch.compile(decode_one_token, dynamic=False, **compile_kw)
        self._prefill = torch.compile(prefill, dynamic=True, **({"backend": backend}))
        self._caches: dict[tuple[int, int, torch.dtype], Any] = {}

    def new_cache(self, model: nn.Module, rows: int, length: int) -> Any:
        capacity = _capacity(length, self.bucket)
        key = (rows, capacity, next(model.parameters()).dtype)
        if type(model) is Llama and key in self._caches:
            # stale keys past the new prompt are masked until overwritten: no need to zero them
            return self._caches[key]
        cache = model.new_kv_cache(rows, capacity, static=True)
        if self.cuda:  # CUDA graphs may then keep the cache's addresses instead of copying it per step
            for buf in (*cache.k_layers, *cache.v_layers):
                torch._dynamo.mark_static_address(buf)
        if type(model) is Llama:
            self._caches[key] = cache
        return cache

    def prefill(self, model: nn.Module, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        return self._prefill(model, tokens, cache).clone()

    def decode_one_token(
        self, model: nn.Module, token: torch.Tensor, cache: Any, pos: torch.Tensor
    ) -> torch.Tensor:
        if self.cuda and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        # a CUDA graph's output lives in memory the next replay overwrites: keep a copy
        return self._decode(model, token.contiguous(), cache, pos).clone()

    def steps(self) -> DecodeSteps:
        return DecodeSteps(
            static_cache=True,
            prefill=self.prefill,
            decode_one_token=self.decode_one_token,
            new_cache=self.new_cache,
        )


def compiled_steps(
    model: nn.Module, mode: str | None = None, bucket: int = 256, backend: str = "inductor"
) -> DecodeSteps:
    """`DecodeSteps` with a static cache and compiled steps for `model` (a `Llama` or a composed model
    whose `new_kv_cache` takes `static=True`, e.g. `MultimodalLlama`). Keep the result and pass it to
    every `generate` call: compiling happens on the first calls, later ones reuse the graphs.
    `backend="eager"` runs the same path uncompiled (dynamo only), for tests."""
    if "static" not in model.new_kv_cache.__code__.co_varnames:
        raise ValueError(f"{type(model).__name__}.new_kv_cache has no static cache; decode it eagerly")
    return CompiledSteps(model, mode, bucket, backend).steps()


def load_for_decoding(
    path: str, device: str = "cpu", dtype: str | None = None, compile: bool = False, fp8: bool = False
) -> tuple[nn.Module, Any, DecodeSteps]:
    """A text checkpoint ready for `generate`: (model, tokenizer, steps). `fp8` (or a checkpoint written by
    `herd quantize fp8`) quantizes the paper's FFN layers (`herd.quantize.apply_fp8`: torchao on an
    H100/H200, the emulation elsewhere); `compile` gives `compiled_steps`, else the eager steps."""
    from herd.quantize import apply_fp8, is_fp8_checkpoint, load_fp8_weights, torchao_fp8_available
    from herd.text.generation import EAGER_STEPS
    from herd.text.loading import load_pretrained

    model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
    if is_fp8_checkpoint(path) and not torchao_fp8_available(next(model.parameters()).device):
        load_fp8_weights(model, path)  # the stored e4m3 weights and scales
    elif fp8 or is_fp8_checkpoint(path):
        apply_fp8(model)  # torchao requantizes the high-precision copy: the same e4m3 values
    return model, tokenizer, compiled_steps(model) if compile else EAGER_STEPS


__all__ = ["CompiledSteps", "compiled_steps", "default_mode", "load_for_decoding"]
