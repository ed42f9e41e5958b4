"""Context parallelism (Llama 3 §3.3.2): load-balanced chunks + all-gathered K/V reproduce the full
sequence's logits and gradients, under a causal + document mask, on gloo ranks."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from herd.losses import causal_lm_loss
from herd.parallel.context_parallel import (
    GatherSequence,
    apply_context_parallel,
    load_balanced_positions,
    remove_context_parallel,
    shard_batch_for_cp,
)
from herd.parallel.launch import spawn_ranks
from herd.text.args import get_preset
from herd.text.model import build_llama

T, B, VOCAB = 32, 2, 97


def tiny_model() -> nn.Module:
    torch.manual_seed(0)  # identical weights on every rank
    args = get_preset(
        "tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16, max_seq_len=128
    )
    return build_llama(args)


def full_batch() -> dict[str, torch.Tensor]:
    """Batch 2, T=32, three documents per row whose boundaries fall inside chunks (chunk length 8 at
    CP=2, 4 at CP=4), with the packer's -100 labels at each document's last token."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    docs = torch.zeros(B, T, dtype=torch.long)
    for row, cuts in enumerate(((5, 19), (11, 26))):
        for cut in cuts:
            docs[row, cut:] += 1
            labels[row, cut - 1] = -100
    return {"tokens": tokens, "labels": labels, "document_ids": docs}


def _cp_matches_full_sequence(mesh_dims: tuple[int, ...], use_mesh: bool) -> dict[str, float]:
    """On each rank: single-process reference, then the CP run on this rank's chunks; returns max diffs.

    Without `use_mesh` the CP group is a plain new_group over the world; with it, the "cp" dimension of
    a (cp,) or (dp, cp) device mesh — in the 2-D case the CP group is a sub-group of the world.
    """
    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", mesh_dims, mesh_dim_names=("dp", "cp")[-len(mesh_dims) :])
        group, cp, cp_rank = mesh["cp"], mesh_dims[-1], mesh["cp"].get_local_rank()
    else:
        group = dist.new_group(list(range(mesh_dims[0])))
        cp, cp_rank = mesh_dims[0], dist.get_rank()
    model, batch = tiny_model(), full_batch()

    ref_logits = model(batch["tokens"], document_ids=batch["document_ids"])  # (B, T, V)
    causal_lm_loss(ref_logits, batch["labels"])[0].backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    apply_context_parallel(model, group)
    local = shard_batch_for_cp(batch, cp_rank, cp)
    logits = model(local["tokens"], document_ids=local["document_ids"], positions=local["positions"])
    loss_sum, n_local = causal_lm_loss(logits, local["labels"])  # (B, T_local, V) → local sum
    loss_sum.backward()
    pg = group.get_group() if hasattr(group, "get_group") else group
    grad_rel = 0.0
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=pg)  # what FSDP does over dp_shard_cp
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        grad_rel = max(grad_rel, ((p.grad - ref_grads[name]).abs().max() / scale).item())
    count = torch.tensor([n_local])
    dist.all_reduce(count, group=pg)  # the loop's all-reduce of target counts
    remove_context_parallel(model)
    return {
        "logits": (logits - ref_logits[:, local["positions"]]).abs().max().item(),
        "grad_rel": grad_rel,
        "count_ok": float(int(count) == int((batch["labels"] != -100).sum())),
    }


def _gather_backward_matches_concatenation() -> float:
    """GatherSequence vs autograd of a plain concatenation of every rank's tensor (all known locally)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 3, 2, 4, generator=g) for _ in range(world)]  # (B, T_local, K, hd) per rank
    w = torch.randn(world, 2, 3 * world, 2, 4, generator=g)  # per-rank loss weights on the gathered tensor
    # reference: total loss = sum_r <w_r, cat(xs)>, differentiated w.r.t. this rank's block
    ref_in = [x.clone().requires_grad_() for x in xs]
    cat = torch.cat(ref_in, dim=1)
    sum((w[r] * cat).sum() for r in range(world)).backward()
    mine = xs[rank].clone().requires_grad_()
    gathered = GatherSequence.apply(mine, group)  # (B, world·T_local, K, hd)
    (w[rank] * gathered).sum().backward()  # this rank's share of the loss only
    ids = GatherSequence.apply(torch.arange(3)[None] + 3 * rank, group)  # integer tensors: no grad
    assert ids.tolist() == [list(range(3 * world))] and not ids.requires_grad
    fwd = (gathered.detach() - torch.cat(xs, dim=1)).abs().max().item()
    return max(fwd, (mine.grad - ref_in[rank].grad).abs().max().item())


def test_load_balanced_positions():
    assert load_balanced_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert load_balanced_positions(16, 2, 1).tolist() == list(range(4, 12))
    everything = torch.cat([load_balanced_positions(24, 3, r) for r in range(3)])
    assert sorted(everything.tolist()) == list(range(24))


def test_indivisible_sequence_is_refused():
    with pytest.raises(ValueError, match="seq_len 30 is not divisible by 8"):
        load_balanced_positions(30, 4, 0)
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch_for_cp({"tokens": torch.zeros(2, 10, dtype=torch.long)}, 0, 4)


def test_shard_batch_slices_every_sequence_tensor():
    batch = full_batch() | {"loss_mask": torch.ones(B, T), "embeds": torch.randn(B, T, 5), "name": "x"}
    batch["image"] = torch.randn(B, 3, 4)  # not (B, T, ...): passes through
    local = shard_batch_for_cp(batch, 1, 2)
    pos = local["positions"]
    assert pos.tolist() == list(range(8, 24))
    for key in ("tokens", "labels", "document_ids", "loss_mask", "embeds"):
        assert torch.equal(local[key], batch[key][:, pos]), key
    assert local["image"] is batch["image"] and local["name"] == "x"


def test_apply_and_remove_reach_a_nested_llama():
    composed = nn.ModuleDict({"text": tiny_model(), "proj": nn.Linear(2, 2)})
    apply_context_parallel(composed, None)  # the group is only used when the model runs
    assert composed["text"].kv_gather is not None
    remove_context_parallel(composed)
    assert composed["text"].kv_gather is None
    with pytest.raises(TypeError, match="no module with context-parallel attention"):
        apply_context_parallel(nn.Linear(2, 2), None)


@pytest.mark.parametrize(
    "mesh_dims,use_mesh",
    [((2,), False), ((4,), True), ((2, 2), True)],
    ids=["cp2-group", "cp4-mesh", "dp2xcp2-mesh"],
)
def test_cp_logits_and_gradients_match_the_full_sequence(mesh_dims, use_mesh):
    world = 1
    for d in mesh_dims:
        world *= d
    results = spawn_ranks(_cp_matches_full_sequence, world, mesh_dims, use_mesh, timeout_s=120)
    for rank, got in enumerate(results):
        assert got["logits"] < 1e-5, f"rank {rank}: max |logit diff| = {got['logits']:.2e}"
        assert got["grad_rel"] < 1e-5, f"rank {rank}: max grad diff / grad scale = {got['grad_rel']:.2e}"
        assert got["count_ok"] == 1.0, f"rank {rank}: all-reduced target count differs from the full batch"


def test_gather_sequence_backward_is_a_reduce_scatter():
    for rank, diff in enumerate(spawn_ranks(_gather_backward_matches_concatenation, 2, timeout_s=60)):
        assert diff < 1e-6, f"rank {rank}: max diff vs concatenation = {diff:.2e}"
