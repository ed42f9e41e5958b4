"""Context parallelism as in Llama 3 (§3.3.2): load-balanced chunks, all-gathered keys and values.

The sequence of length T is cut into 2×CP chunks; CP rank i holds chunks i and 2×CP−1−i, so under the
causal mask every rank has the same amount of attention work (an early chunk with few keys paired with a
late chunk with many). Each attention layer all-gathers K and V along the sequence — the paper's choice
over ring attention: simpler, works with any mask (document masks included), and K/V are small under
GQA — and attends its local queries to the whole sequence's keys. The causal + document mask is built
from *absolute positions*, gathered the same way (see `herd.text.model.causal_document_mask`), so the
gathered keys need no reordering: rank r's block simply lands at [r·T_local, (r+1)·T_local).

The model declares where its attention gathers: every module with a `kv_gather` attribute (herd's `Llama`
has one and hands it to its attention layers); `apply_context_parallel` sets it, nothing else changes.
Usage in a training step (the model stays a plain single-device module; only `kv_gather` is set)::

    apply_context_parallel(model, mesh["cp"])          # once, after building the model
    local = shard_batch_for_cp(batch, cp_rank, cp)     # every step
    logits = model(local["tokens"], document_ids=local["document_ids"], positions=local["positions"])
    loss_sum, n_targets = causal_lm_loss(logits, local["labels"])

Loss and gradients: each CP rank computes the *summed* loss over its own tokens and its own target
count. Back-propagating the local sum gives each rank the gradient of its share of the loss (the
reduce-scatter in `GatherSequence.backward` routes the key/value gradients back to the ranks that own
those tokens); summing parameter gradients over the CP group (FSDP does it: CP ranks join the
"dp_shard_cp" mesh) gives the gradient of the full sequence's summed loss. The training loop therefore
all-reduces the target counts over "dp_cp" and divides the summed loss (and gradients) by that global
count — exactly as for data parallelism; CP needs no special loss code.

Collectives are plain `torch.distributed` calls with the group always passed explicitly (torch's
built-in ring `context_parallel` does not run on CPU). gloo in the pinned torch (2.11) implements
`all_gather_into_tensor` and `reduce_scatter_tensor` (concatenated dim-0 layout only), so the CPU
tests run the very code path NCCL runs — no all-reduce-and-slice fallback is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Group = Any  # a ProcessGroup, or a 1-D DeviceMesh (e.g. mesh["cp"])


def _as_process_group(group: Group) -> dist.ProcessGroup:
    # A 1-D DeviceMesh (mesh["cp"]) is accepted for convenience; the collectives need its ProcessGroup.
    if hasattr(group, "get_group"):
        if group.ndim != 1:
            raise ValueError(f"context parallelism needs a 1-D mesh (the cp dimension), got {group.ndim}-D")
        return group.get_group()
    return group


# --- sharding the batch --------------------------------------------------------------------------


def load_balanced_positions(
    seq_len: int, cp: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Absolute positions (T_local,) of CP rank `cp_rank`: chunk i then chunk 2·cp−1−i of 2·cp chunks."""
    if cp < 1 or not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank must be in [0, {cp}) with cp >= 1, got cp={cp}, cp_rank={cp_rank}")
    if seq_len % (2 * cp):
        raise ValueError(
            f"context parallelism cuts the sequence into 2×cp = {2 * cp} chunks: seq_len {seq_len} "
            f"is not divisible by {2 * cp}"
        )
    c = seq_len // (2 * cp)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c, device=device)
    return torch.cat([first, second])  # (T_local,) = (seq_len / cp,)


def shard_batch_for_cp(batch: dict[str, Any], cp_rank: int, cp: int) -> dict[str, Any]:
    """This CP rank's share of a batch: every tensor shaped (B, T, ...) is sliced along dim 1 by
    `load_balanced_positions`, other entries pass through, and `positions` (T_local,) is added.

    B and T are read from `tokens` (or `labels` when there are no tokens, e.g. an embeddings batch).
    """
    ref = batch.get("tokens", batch.get("labels"))
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
        raise ValueError("shard_batch_for_cp needs a (B, T) `tokens` or `labels` tensor in the batch")
    if "positions" in batch:
        raise ValueError("batch already has `positions`: was it sharded for context parallelism twice?")
    B, T = ref.shape
    positions = load_balanced_positions(T, cp, cp_rank, device=ref.device)  # (T_local,)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (B, T):
            out[key] = value.index_select(1, positions.to(value.device))  # (B, T_local, ...)
        else:
            out[key] = value
    out["positions"] = positions
    return out


# --- the differentiable all-gather ---------------------------------------------------------------


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, T_local, ...) on every rank → (B, cp·T_local, ...), ranks' blocks concatenated in rank order."""
    cp = dist.get_world_size(group)
    x = x.contiguous()
    # all_gather_into_tensor concatenates along dim 0 into one buffer (gloo rejects a stacked
    # (cp, B, ...) output): gather into (cp·B, T_local, ...), then move the rank dim next to the sequence.
    buf = x.new_empty((cp * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(buf, x, group=group)
    return buf.unflatten(0, (cp, x.shape[0])).movedim(0, 1).flatten(1, 2)  # (B, cp·T_local, ...)


def _reduce_scatter_seq(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(B, cp·T_local, ...) on every rank → sum over ranks of this rank's block (B, T_local, ...)."""
    cp = dist.get_world_size(group)
    B, S = grad.shape[:2]
    t_local = S // cp
    # reduce_scatter_tensor splits dim 0 into cp blocks (gloo insists on the concatenated layout
    # (cp·B, ...), not a stacked (cp, B, ...)): bring the rank dim to the front, then merge it with B.
    blocks = grad.unflatten(1, (cp, t_local)).movedim(1, 0).flatten(0, 1).contiguous()  # (cp·B, T_l, ...)
    out = grad.new_empty((B, t_local, *grad.shape[2:]))
    dist.reduce_scatter_tensor(out, blocks, op=dist.ReduceOp.SUM, group=group)
    return out  # (B, T_local, ...)


class GatherSequence(torch.autograd.Function):
    """All-gather along dim 1 over a CP group; backward reduce-scatters (sums) the gradient.

    The backward is a sum because every rank's local loss depends on every rank's keys/values: the
    gradient of the total loss w.r.t. this rank's K/V is the sum of all ranks' contributions.
    Integer tensors (positions, document ids) pass through forward without building a graph.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_seq(x, group)  # (B, S, ...)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_seq(grad, ctx.group), None  # (B, T_local, ...)


def gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Differentiable all-gather of (B, T_local, ...) into (B, cp·T_local, ...) over `group`."""
    pg = _as_process_group(group)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _all_gather_seq(x, pg)  # ids, positions, inference: no autograd node needed
    return GatherSequence.apply(x, pg)


# --- applying it to a model -----------------------------------------------------------------------


def context_parallel_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` whose attention can gather keys and values: those with a `kv_gather`."""
    found = [m for m in model.modules() if hasattr(m, "kv_gather")]
    if not found:
        raise TypeError(
            f"{type(model).__name__} holds no module with context-parallel attention (a `kv_gather` "
            "attribute, as herd.text.Llama has)"
        )
    return found


def apply_context_parallel(model: nn.Module, cp_group: Group) -> None:
    """Make every context-parallel attention inside `model` attend over the whole sequence gathered
    from `cp_group`.

    Afterwards the model must be called with `positions=` (from `shard_batch_for_cp`) on every rank of
    the group, in lockstep: each attention layer runs two all-gathers (K, V) forward and two
    reduce-scatters backward. KV-cache decoding is not context-parallel; call
    `remove_context_parallel` first.
    """
    pg = _as_process_group(cp_group)

    # A closure, not a callable object: deepcopy treats functions as atomic, so copying the
    # model (EMA, reference policies) does not try to copy the process group.
    def kv_gather(x: torch.Tensor) -> torch.Tensor:
        return gather_sequence(x, pg)  # (B, T_local, ...) → (B, S, ...)

    for module in context_parallel_modules(model):
        module.kv_gather = kv_gather


def remove_context_parallel(model: nn.Module) -> None:
    """Undo `apply_context_parallel`: the model runs on its local tokens alone again."""
    for module in context_parallel_modules(model):
        module.kv_gather = None


__all__ = [
    "GatherSequence",
    "apply_context_parallel",
    "context_parallel_modules",
    "gather_sequence",
    "load_balanced_positions",
    "remove_context_parallel",
    "shard_batch_for_cp",
]
