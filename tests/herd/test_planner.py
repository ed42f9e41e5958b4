"""herd plan: the memory model against measured CPU training steps, the paper's 405B layouts, ranking.

Measurement: one fp32 AdamW step on CPU with optimizer state and gradients already allocated; params,
grads and optimizer bytes are read from the tensors; activations are (a) the storages autograd saves
(`saved_tensors_hooks`, deduplicated by storage) and (b) every storage allocated during the forward
that is still alive at its end (a dispatch mode with a weakref per storage), which also sees what
activation checkpointing keeps outside autograd. The same mode gives the true peak of the step.
"""

import json
import weakref
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from herd.commands import build_parser
from herd.config import ParallelConfig
from herd.job_plan import parse_count, parse_size
from herd.parallel.activation_checkpoint import apply_activation_checkpointing
from herd.parallel.pipeline import split_layers
from herd.planner import (
    AC_MODES,
    GiB,
    Impl,
    Layout,
    enumerate_layouts,
    estimate_memory,
    in_flight_chunks,
    microbatches_per_step,
    project_throughput,
)
from herd.plans.llama import LLAMA_PLAN
from herd.text.args import ModelArgs, get_preset

SHAPES = {
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
    "mha": dict(dim=96, n_layers=3, n_heads=6, n_kv_heads=6, vocab_size=1000, multiple_of=64),
}
B, T = 2, 64
G16M = 16 * 2**20  # the paper's 16M-token batch: 2048 sequences of 8192


def _local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside a DTensor (or another wrapper subclass): it owns the storage."""
    while is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        t = getattr(t, attrs[0])
    return t


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while active that are still alive; `peak` is the maximum."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude, self.ids, self.now, self.peak = exclude, set(), 0, 0

    def _freed(self, key: int, nbytes: int) -> None:
        self.ids.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = _local(
                    t
                ).untyped_storage()  # storage PyObjects are preserved: one per storage, weakref-able
                if id(s) not in self.exclude and id(s) not in self.ids:
                    self.ids.add(id(s))
                    self.now += s.nbytes()
                    weakref.finalize(s, self._freed, id(s), s.nbytes())
        self.peak = max(self.peak, self.now)
        return out


def measure_step(args: ModelArgs, ac: str, document_mask: bool, attention: str) -> dict[str, int]:
    from herd.text.model import build_llama

    torch.manual_seed(0)
    model = build_llama(args)  # fp32
    apply_activation_checkpointing(model, LLAMA_PLAN.checkpoint_units(model), ac)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    tokens, labels = torch.randint(0, args.vocab_size, (2, B, T))
    docs = (torch.arange(T) * 2 // T).expand(B, T).contiguous() if document_mask else None

    def loss() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH) if attention == "math" else nullcontext():
            logits = model(tokens, document_ids=docs)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")

    params = list(model.parameters())
    for p in params:  # fp32 grads stay resident, as under gradient accumulation
        p.grad = torch.zeros_like(p)
    opt.step()  # creates AdamW's state, as a previous step would have
    state = [t for s in opt.state.values() for t in s.values()]
    static = params + [p.grad for p in params] + state + list(model.buffers()) + [tokens, labels, docs]
    static_ptrs = {t.untyped_storage().data_ptr() for t in static if t is not None}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in static_ptrs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    live = LiveBytes({id(t.untyped_storage()) for t in static if t is not None})
    with live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss()
        after_forward = live.now
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    m = dict(
        params=sum(p.untyped_storage().nbytes() for p in params),
        grads=sum(p.grad.untyped_storage().nbytes() for p in params),
        optimizer=sum(t.untyped_storage().nbytes() for t in state),
        saved=sum(saved.values()),
        activations=after_forward,
    )
    m["resident"] = m["params"] + m["grads"] + m["optimizer"] + m["activations"]
    m["peak"] = m["params"] + m["grads"] + m["optimizer"] + live.peak
    return m


CASES = [
    ("gqa", "none", False, "flash"),
    ("gqa", "none", True, "flash"),  # CPU flash keeps a float copy of the (B,1,T,T) mask per layer
    ("gqa", "none", True, "math"),  # math SDPA keeps the (B,H,T,T) softmax probabilities instead
    ("gqa", "full", True, "flash"),
    ("gqa", "selective", False, "flash"),
    ("mha", "none", False, "flash"),
    ("mha", "none", False, "math"),
    ("mha", "full", False, "flash"),
    ("mha", "selective", True, "flash"),
]


@pytest.mark.parametrize("shape,ac,document_mask,attention", CASES)
def test_estimate_matches_a_measured_cpu_step(shape, ac, document_mask, attention):
    args = ModelArgs(**SHAPES[shape], max_seq_len=T)
    got = measure_step(args, ac, document_mask, attention)
    impl = Impl(kernels="eager", attention_impl=attention, document_mask=document_mask)
    est = estimate_memory(args, Layout(), T, B, 1, ac, param_dtype="fp32", impl=impl)
    assert est.params == got["params"] == 4 * args.num_params()
    assert est.grads == got["grads"]
    assert est.optimizer == pytest.approx(got["optimizer"], rel=1e-3)  # + AdamW's scalar step counters
    if ac == "none":  # no checkpoint holds tensors outside autograd: both measurements agree
        assert got["saved"] == pytest.approx(got["activations"], abs=16)
    # the activation count is exact up to the int64 token ids / labels and scalars
    assert est.activations == pytest.approx(got["activations"], rel=0.02), est.layer_terms
    assert est.resident == pytest.approx(got["resident"], rel=0.15)
    assert est.total == pytest.approx(got["peak"], rel=0.15)  # transients: loss, grad temporaries


def measure_sharded_forward(args: ModelArgs, tp: int, cp: int, ac: str) -> int:
    """Activation bytes of rank 0 of a tp × cp mesh, in this process: torch's "fake" process group
    runs no communication but gives every collective its real output shape, which is all memory needs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from herd.parallel.context_parallel import apply_context_parallel, shard_batch_for_cp
    from herd.plans.llama import apply_tensor_parallel
    from herd.text.model import Llama

    dist.init_process_group("fake", rank=0, world_size=tp * cp, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (cp, tp), mesh_dim_names=("cp", "tp"))
        with torch.device("meta"):
            model = Llama(args)
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"])  # with sequence parallelism
        apply_activation_checkpointing(model, LLAMA_PLAN.checkpoint_units(model), ac)
        if cp > 1:
            apply_context_parallel(model, mesh["cp"])
        model.to_empty(device="cpu")
        model.init_weights()
        tokens, labels = torch.randint(0, args.vocab_size, (2, B, T))
        batch = dict(tokens=tokens, labels=labels, document_ids=(torch.arange(T) * 2 // T).expand(B, T))
        batch = shard_batch_for_cp(batch, 0, cp) if cp > 1 else batch
        static = [*model.parameters(), *model.buffers(), *batch.values()]
        live = LiveBytes({id(_local(t).untyped_storage()) for t in static})
        with live:
            logits = model(
                batch["tokens"], document_ids=batch["document_ids"], positions=batch.get("positions")
            )
            loss = F.cross_entropy(_local(logits).flatten(0, 1).float(), batch["labels"].flatten())
            del logits  # not saved for backward (the loss keeps fp32 log-probs); `loss` holds the graph
        assert loss.requires_grad
        return live.now
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:DTensor random operators")
@pytest.mark.parametrize(
    "tp,cp,ac", [(2, 1, "none"), (1, 2, "none"), (2, 2, "none"), (2, 1, "selective"), (2, 2, "full")]
)
def test_estimate_matches_tensor_and_context_parallel_shards(tp, cp, ac):
    """herd's DTensor TP keeps the all-gathered inputs of wq/wk/wv and w1/w3 and the pre-reduce-scatter
    outputs of wo/w2 at full sequence length, and full logits on every rank (Impl.herd); CP keeps the
    gathered K/V and a (B,1,T/cp,T) mask per layer."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    args = ModelArgs(**SHAPES["gqa"], max_seq_len=T)
    got = measure_sharded_forward(args, tp, cp, ac)
    impl = Impl(document_mask=True, tp_saves_gathered=True, loss_parallel=False)
    est = estimate_memory(args, Layout(tp=tp, cp=cp), T, B, 1, ac, "fp32", impl=impl)
    # the estimate also counts the int64 token ids and labels, which this measurement excludes
    assert est.activations - 16 * B * T // cp == pytest.approx(got, rel=0.02), est.layer_terms


def test_attention_storage_math_vs_flash():
    args = ModelArgs(**SHAPES["gqa"], max_seq_len=T)
    terms = {
        impl: estimate_memory(
            args, Layout(), T, B, 1, "none", "fp32", impl=Impl(attention_impl=impl)
        ).layer_terms
        for impl in ("flash", "math")
    }
    assert terms["math"]["attention probabilities (T×S)"] == 4 * B * args.n_heads * T * T
    assert not any("T×S" in k or "mask" in k for k in terms["flash"])


# --- the paper's 405B layouts (assertions state what the formulas give; docs/planner.md explains) --
def paper_405b(layout: Layout, ac: str = "none", impl: Impl | None = None, seq: int = 8192):
    args = get_preset("llama3_1_405b")
    M = microbatches_per_step(layout, seq, G16M, 1)
    return estimate_memory(
        args, layout, seq, 1, M, ac, "bf16", impl=impl or Impl.paper(), reserve_bytes=3 * GiB
    )


def interleaved(**kw) -> Layout:
    return Layout(pp_schedule="Interleaved1F1B", pp_virtual_stages=8, **kw)


def test_405b_tp8_pp16_dp64_fits_80gb():
    m = paper_405b(Layout(tp=8, pp=16, dp_shard=64))  # 1F1B
    assert m.total < 80 * GiB
    assert m.pp_rank == 1 and m.in_flight == 15  # rank 1: 8 layers × 15 in flight beats rank 0's 7 × 16
    # with the paper's V = 8 (its first chunk holds only the embedding) no-AC is ~4 GiB over, selective fits
    assert 80 * GiB < paper_405b(interleaved(tp=8, pp=16, dp_shard=64)).total < 88 * GiB
    assert paper_405b(interleaved(tp=8, pp=16, dp_shard=64), "selective").total < 70 * GiB
    # 131K tokens, CP 16: 85 GiB without AC, so the planner picks selective AC
    long = paper_405b(interleaved(tp=8, cp=16, pp=16, dp_shard=8), "selective", seq=131_072)
    assert long.total < 80 * GiB


def test_405b_layouts_that_do_not_fit():
    for ac in AC_MODES:  # TP 1: 25B parameters per rank in bf16 alone
        assert paper_405b(interleaved(tp=1, pp=16, dp_shard=512), ac).total > 80 * GiB
    assert (
        paper_405b(
            Layout(tp=8, pp=8, dp_shard=128, pp_schedule="Interleaved1F1B", pp_virtual_stages=16)
        ).total
        > 80 * GiB
    )
    # this repository's implementation: eager ops, unsharded fp32 grad accumulation, dense masks
    herd = Impl.herd()
    assert paper_405b(interleaved(tp=8, pp=16, dp_shard=64), "selective", herd).total > 80 * GiB
    assert paper_405b(interleaved(tp=8, pp=16, dp_shard=64), "full", herd).total < 80 * GiB


def test_throughput_calibration_reproduces_the_paper():
    args = get_preset("llama3_1_405b")
    mfu = [
        project_throughput(args, lay, seq, G16M, impl=Impl.paper()).mfu
        for lay, seq in [
            (interleaved(tp=8, pp=16, dp_shard=64), 8192),
            (interleaved(tp=8, pp=16, dp_shard=128), 8192),
            (interleaved(tp=8, cp=16, pp=16, dp_shard=8), 131_072),
        ]
    ]
    assert mfu == pytest.approx([0.43, 0.41, 0.38], abs=0.01)
    # the bubble is the paper's (pp − 1)/(V·M)
    t = project_throughput(args, interleaved(tp=8, pp=16, dp_shard=64), 8192, G16M)
    assert t.n_microbatches == 32 and t.bubble == pytest.approx(15 / (8 * 32))


def test_pipeline_in_flight_micro_batches():
    assert [in_flight_chunks("1F1B", 4, 1, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks("GPipe", 4, 1, 0, 8) == 8
    assert in_flight_chunks("1F1B", 1, 1, 0, 8) == 1  # gradient accumulation: one at a time
    pp, v = 16, 8  # interleaved rank 0: pp·(1 + (pp−1)/(pp·V)) micro-batches of its layers (Korthikanti)
    assert in_flight_chunks("Interleaved1F1B", pp, v, 0, 64) / v == pytest.approx(
        pp * (1 + (pp - 1) / (pp * v))
    )


# --- enumeration ---------------------------------------------------------------------------------
def test_enumeration_is_valid_and_ranked():
    args = get_preset("llama3_8b", n_kv_heads=4)
    plans = enumerate_layouts(64, 16 * GiB, args, 4096, 2**21, include_unfit=True)
    assert plans and any(p.fits for p in plans) and not all(p.fits for p in plans)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True)  # fitting plans first
    speed = [p.throughput.tokens_per_s_per_gpu for p in plans if p.fits]
    assert speed == sorted(speed, reverse=True)
    for p in plans:
        lay = p.layout
        assert lay.world == 64 and lay.tp in (1, 2, 4)  # KV heads 4: TP 8 is invalid
        assert p.fits == (p.memory.total <= 16 * GiB)
        split = split_layers(args.n_layers, lay.pp * lay.pp_virtual_stages, lay.pp_fewer_layers_on_ends)
        middle = [len(s) for s in split[1:-1]] or [len(split[0])]
        assert max(middle) == min(middle)  # an even pipeline split
        assert 2**21 // 4096 % (lay.dp * p.throughput.n_microbatches) == 0
    fitting = enumerate_layouts(64, 16 * GiB, args, 4096, 2**21)
    assert [p.layout for p in fitting] == [p.layout for p in plans if p.fits]


def test_enumeration_excludes_what_herd_cannot_run():
    tied = get_preset("llama3_2_1b")  # tied embeddings: no TP, no PP in herd
    plans = enumerate_layouts(16, 80 * GiB, tied, 8192, 2**20, include_unfit=True)
    assert plans and all(p.layout.tp == 1 and p.layout.pp == 1 for p in plans)
    odd = enumerate_layouts(16, 80 * GiB, tied, 8190, 8190 * 16, include_unfit=True)
    assert all(p.layout.cp == 1 for p in odd)  # 8190 does not split into 2·cp chunks
    assert enumerate_layouts(16, 1 * GiB, get_preset("llama3_8b"), 8192, 2**20) == []


def test_layout_from_parallel_config():
    lay = Layout.of(ParallelConfig(tp=8, pp=16, dp_shard=-1), world=8192)
    assert (lay.tp, lay.pp, lay.dp, lay.fsdp_shards, lay.world) == (8, 16, 64, 64, 8192)
    assert Layout.of({"tp": 2, "cp": 2, "dp_shard": 4}).fsdp_shards == 8  # FSDP shards over dp_shard × cp
    with pytest.raises(ValueError, match="dp_shard = -1"):
        Layout.of(ParallelConfig(tp=8, dp_shard=-1), world=12)


# --- CLI -----------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_json_and_table(capsys, tmp_path):
    assert (
        run_cli(
            ["plan", "--preset", "llama3_1_405b", "--gpus", "8192", "--impl", "paper", "--json", "--top", "3"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["global_batch_tokens"] == G16M and len(report["plans"]) == 3
    assert report["plans"][0]["fits"] and report["plans"][0]["memory"]["total"] <= 80 * GiB
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        '[model]\npreset = "llama3_8b"\n[data]\nseq_len = 4096\nbatch_size = 64\n[parallel]\ntp = 2\n'
    )
    assert run_cli(["plan", "--config", str(cfg), "--gpus", "16", "--gpu-mem", "80GB", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "configured layout" in out and "TP2 CP1 PP1 DP8" in out and "fits?" in out
    assert run_cli(["plan", "--preset", "llama3_1_405b", "--gpus", "8", "--top", "1"]) == 1  # nothing fits


def test_size_and_count_parsing():
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80") == 80 * GiB
    assert parse_size("512MiB") == 2**29
    assert parse_count("16M") == G16M and parse_count("4K") == 4096 and parse_count("1_000") == 1000
