"""Pipeline-parallel inference (paper §6.1): the model's layers split over the ranks of a pipeline group,
several micro-batches in flight so that the stages overlap, generation by the one decode loop.

    torchrun --nproc-per-node 2 -m herd generate --model M --prompt a --prompt b --pp 2 --microbatches 2

Rank 0 drives: it splits the prompts into micro-batches and runs `herd.text.generation.generate` on each
in its own thread, on a `PipelinedModel` — a stand-in whose forward runs stage 0 locally, sends the
hidden states down the pipeline and waits for the last stage's logits. While micro-batch 0 waits for its
logits, micro-batch 1's forward occupies stage 0, and so on: the stages overlap as the paper's schedule
does (its measurement: 2 micro-batches for 4,096 input and 256 output tokens). The other ranks serve
their stage (`serve_stage`): receive (header, activations), run their layers with that micro-batch's KV
cache, send on; the last stage sends the logits of the last position back to rank 0. Every row's tokens
are what one process generates (the decode loop, its sampler and stop rules all run on rank 0).

Stages come from the model's plan (`ParallelPlan.pipeline`: unit sizes and `build_stage`), split by
`split_units`; a stage keeps the model's decoding API (`forward_hidden(tokens | input_embeds, kv_cache,
start_pos)`, `head`, `new_kv_cache`), so no model class is named here. Each stage's cache covers the
model's layer count (a layer's index is global); only its own layers' slices are written.

Messages: a header (6 int64: micro-batch id, kind, start_pos, rows, length, cache capacity), then the payload;
rank 0's threads share the link to rank 1 under a lock, the logits return with the micro-batch's tag.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from herd.parallel.pipeline import split_units
from herd.parallel.plan import ParallelPlan

FORWARD, RELEASE, STOP = 0, 1, 2
HEADER = 6  # micro-batch id, kind, start_pos, rows, length, cache capacity


def build_inference_stage(model: nn.Module, plan: ParallelPlan, pp: int, rank: int) -> nn.Module:
    """This rank's stage of `model` (materialised: its weights are copied), split by the plan's rule."""
    if plan.pipeline is None:
        raise ValueError(f"the {plan.name} plan has no pipeline split")
    units = split_units(plan.pipeline.unit_sizes(model), pp, fewer_on_ends=False)
    return plan.pipeline.build_stage(model, rank, pp, units[rank]).eval()


class _Cache:
    """Stage 0's KV cache of one micro-batch, tagged with the id the other stages know it by."""

    def __init__(self, local: Any, mb: int) -> None:
        self.local, self.mb = local, mb


class PipelinedModel(nn.Module):
    """Rank 0's stand-in for the whole model in the decode loop (see the module doc)."""

    def __init__(self, stage: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.args = stage.args
        self.group = group
        self.pp = dist.get_world_size(group)
        self.device = next(stage.parameters()).device  # NCCL sends CUDA tensors only: headers too
        self._send_lock = threading.Lock()
        self._ids = iter(range(1 << 30))
        self._id_lock = threading.Lock()

    def new_kv_cache(self, batch_size: int, max_seq_len: int | None = None, **_: Any) -> _Cache:
        with self._id_lock:
            mb = next(self._ids)
        return _Cache(self.stage.new_kv_cache(batch_size, max_seq_len), mb)

    def _send(self, header: list[int], payload: torch.Tensor | None) -> None:
        with self._send_lock:  # header and payload of one message stay adjacent on the link
            dist.send(torch.tensor(header, dtype=torch.long, device=self.device), 1, group=self.group)
            if payload is not None:
                dist.send(payload.contiguous(), 1, group=self.group)

    def forward(self, tokens: torch.Tensor, kv_cache: _Cache, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) → logits of the last position (B, 1, V), computed across the pipeline."""
        B, T = tokens.shape
        h = self.stage.forward_hidden(tokens, kv_cache=kv_cache.local, start_pos=start_pos)  # (B, T, D)
        self._send([kv_cache.mb, FORWARD, start_pos, B, T, kv_cache.local.max_seq_len], h)
        logits = torch.empty(B, self.args.vocab_size, dtype=h.dtype, device=h.device)
        dist.recv(logits, self.pp - 1, group=self.group, tag=1 + kv_cache.mb)
        return logits[:, None]

    def release(self, cache: _Cache) -> None:
        self._send([cache.mb, RELEASE, 0, 0, 0, 0], None)

    def stop(self) -> None:
        self._send([-1, STOP, 0, 0, 0, 0], None)


def serve_stage(stage: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Ranks 1..pp-1: run this stage for every message until rank 0 says stop (forwarding the stop)."""
    rank, pp = dist.get_rank(group), dist.get_world_size(group)
    last = rank == pp - 1
    caches: dict[int, Any] = {}
    ref = next(stage.parameters())
    dtype, device = ref.dtype, ref.device
    header = torch.empty(HEADER, dtype=torch.long, device=device)
    with torch.inference_mode():
        while True:
            dist.recv(header, rank - 1, group=group)
            mb, kind, start_pos, B, T, capacity = header.tolist()
            if not last:
                send_header = header.clone()
            if kind == FORWARD:
                h = torch.empty(B, T, stage.args.dim, dtype=dtype, device=device)
                dist.recv(h, rank - 1, group=group)
                if start_pos == 0:
                    caches[mb] = stage.new_kv_cache(B, capacity)
                h = stage.forward_hidden(input_embeds=h, kv_cache=caches[mb], start_pos=start_pos)
                if last:
                    dist.send(stage.head(h[:, -1:])[:, 0].contiguous(), 0, group=group, tag=1 + mb)
                    continue
                dist.send(send_header, rank + 1, group=group)
                dist.send(h.contiguous(), rank + 1, group=group)
                continue
            caches.pop(mb, None)
            if not last:
                dist.send(send_header, rank + 1, group=group)
            if kind == STOP:
                return


def generate_pipelined(
    model: PipelinedModel,
    prompts: Sequence[Sequence[int]],
    microbatches: int,
    generate_fn: Any,
    **kwargs: Any,
) -> list[Any]:
    """Rank 0: `generate_fn(model, chunk, **kwargs)` (e.g. `herd.text.generation.generate`) on `microbatches`
    contiguous chunks of the prompts, each in its own thread so that their forwards overlap; the
    completions in prompt order."""
    if microbatches < 1:
        raise ValueError(f"microbatches must be ≥ 1, not {microbatches}")
    n = len(prompts)
    bounds = [n * i // microbatches for i in range(microbatches + 1)]
    chunks = [list(prompts[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    caches: list[_Cache] = []
    new_kv_cache = model.new_kv_cache

    def tracked(*args: Any, **kw: Any) -> _Cache:
        cache = new_kv_cache(*args, **kw)
        caches.append(cache)
        return cache

    model.new_kv_cache = tracked  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(lambda chunk: generate_fn(model, chunk, **kwargs), chunks))
    finally:
        model.new_kv_cache = new_kv_cache  # type: ignore[method-assign]
        for cache in caches:
            model.release(cache)
    return [c for part in parts for c in part]


__all__ = ["PipelinedModel", "build_inference_stage", "generate_pipelined", "serve_stage"]
