"""`herd plan`: per-rank memory of a 4D layout and a projection of its throughput, ranked.

An analytic *model*, not a measurement; the formulas, their sources and the calibration are in
docs/planner.md. Memory: exact parameter counts per rank (TP splits the matrices, PP the layers with
`herd.parallel.pipeline.split_layers`, FSDP shards fp32 master weights, grads and AdamW moments over
dp_shard × cp) plus the tensors autograd keeps per layer — counted from what `herd.text.model` saves
(tests/herd/test_planner.py measures them on CPU), divided by tp as in Korthikanti et al. 2022, times
the micro-batches a pipeline rank holds in flight. Throughput: 6N + 12·L·D·T FLOPs per token at a
fitted matmul efficiency, plus communication over stated bandwidths, times the bubble (pp−1)/(V·M).

The module imports no torch at import time (`herd.parallel.pipeline` is imported where its layer split
is used), so that the `herd` parser, which reads AC_MODES, stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from herd.text.args import ModelArgs

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
AC_MODES = ("none", "selective", "full")  # cheapest recomputation first


@dataclass(frozen=True)
class Layout:
    """Parallel degrees (`herd.config.ParallelConfig`'s names) of one candidate layout."""

    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    pp_schedule: str = "1F1B"
    pp_virtual_stages: int = 1
    pp_fewer_layers_on_ends: bool = True

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.pp * self.tp

    @property
    def fsdp_shards(self) -> int:
        # FSDP's mesh is "dp_shard_cp": CP ranks hold other tokens, so they shard too (herd.parallel.dims)
        return self.dp_shard * self.cp

    def label(self) -> str:
        v = f"×V{self.pp_virtual_stages}" if self.pp_virtual_stages > 1 else ""
        dp = f"DP{self.dp}" if self.dp_replicate == 1 else f"DP{self.dp_replicate}×{self.dp_shard}"
        return f"TP{self.tp} CP{self.cp} PP{self.pp}{v} {dp}"

    @classmethod
    def of(cls, obj: Any, world: int | None = None) -> Layout:
        """From a Layout, a dict or a ParallelConfig-like object; dp_shard = -1 takes the rest of `world`."""
        if isinstance(obj, Layout):
            return obj
        get = obj.get if isinstance(obj, dict) else lambda k, d=None: getattr(obj, k, d)
        kw = {f.name: get(f.name) for f in dataclasses.fields(cls) if get(f.name) is not None}
        if kw.get("dp_shard", 1) == -1:
            rest = kw.get("dp_replicate", 1) * kw.get("cp", 1) * kw.get("pp", 1) * kw.get("tp", 1)
            if world is None or world % rest:
                raise ValueError(f"dp_shard = -1 needs a world size divisible by {rest}, got {world}")
            kw["dp_shard"] = world // rest
        return cls(**kw)


@dataclass(frozen=True)
class Impl:
    """How an implementation spends memory; `Impl.herd(...)` is this repository, `Impl.paper()` the
    paper's stack. Every field is a documented assumption (docs/planner.md, "Implementation profiles")."""

    kernels: str = "eager"  # eager: herd's torch ops | fused: what torch.compile'd blocks keep (≈ Megatron)
    attention_impl: str = "flash"  # flash: no T×S scores stored | math: softmax probabilities stored
    document_mask: bool = False  # a dense (B,1,T,S) mask reaches SDPA and is saved per layer (herd)
    tp_saves_gathered: bool = False  # DTensor SP keeps the all-gathered linear inputs (Megatron does not)
    loss_parallel: bool = True  # vocab-sharded logits over TP (herd: full logits on every TP rank)
    reshard_after_forward: bool = False  # False: bf16 params stay gathered through the step (paper)
    unsharded_grad_accum: bool = False  # FSDP2 no-sync micro-batches: an unsharded fp32 gradient buffer

    @classmethod
    def paper(cls) -> Impl:
        # §3.3.2: fused kernels, gradients and optimizer sharded, "we do not reshard after forward".
        return cls(kernels="fused")

    @classmethod
    def herd(cls, compile: bool = False, reshard_after_forward: bool = True) -> Impl:
        # herd.parallel: DTensor TP with full logits, FSDP2 no-sync accumulation, dense document masks.
        kw = dict(document_mask=True, tp_saves_gathered=True, loss_parallel=False, unsharded_grad_accum=True)
        return cls("fused" if compile else "eager", reshard_after_forward=reshard_after_forward, **kw)


@dataclass
class MemoryBreakdown:
    """Bytes on the most loaded rank; `resident` is what a CPU run measures, `total` what must fit."""

    params: float
    grads: float
    optimizer: float
    activations: float
    transient: float  # the largest momentary working set (loss, recompute, FSDP buffers)
    reserve: float  # CUDA context, NCCL buffers, allocator fragmentation
    pp_rank: int
    layers: int  # Transformer layers on that rank
    in_flight: float  # micro-batches of the rank's layers whose activations are held at once
    layer_terms: dict[str, float] = field(default_factory=dict)  # one layer, one micro-batch

    @property
    def resident(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    @property
    def total(self) -> float:
        return self.resident + self.transient + self.reserve

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"resident": self.resident, "total": self.total}


# --- parameter counts ------------------------------------------------------------------------------
def layer_params(args: ModelArgs, tp: int = 1) -> int:
    """Parameters of one Transformer block on one TP rank (norm weights are replicated)."""
    d, hd = args.dim, args.head_dim
    attn = 2 * d * (args.n_heads // tp) * hd + 2 * d * (args.n_kv_heads // tp) * hd  # type: ignore[operator]
    return attn + 3 * d * math.ceil(args.ffn_hidden_dim / tp) + 2 * d


def rank_params(args: ModelArgs, layout: Layout, layers: int, first: bool, last: bool) -> int:
    emb = math.ceil(args.vocab_size / layout.tp) * args.dim  # embedding rows / head columns split by TP
    n = layers * layer_params(args, layout.tp)
    if first:
        n += emb
    if last:
        n += args.dim + (emb if not args.tie_embeddings or layout.pp > 1 else 0)
    return n


def in_flight_chunks(schedule: str, pp: int, virtual: int, rank: int, n_micro: int) -> int:
    """Stage-chunks × micro-batches whose activations rank `rank` holds at its peak: the warm-up
    forwards of torch.distributed.pipelining's schedules, plus the one in flight at the first backward."""
    if pp == 1:
        return 1  # gradient accumulation runs micro-batches one after the other
    if schedule == "GPipe":
        return n_micro * virtual  # all forwards before any backward
    if virtual == 1:
        return min(pp - rank, n_micro)  # 1F1B: pp − rank warm-up forwards (Narayanan et al. 2021)
    if schedule == "ZBVZeroBubble":
        return virtual * min(pp, n_micro)  # ZB-V keeps 1F1B's peak on every rank (Qi et al. 2024)
    # Interleaved (torch's _get_warmup_ops; Megatron's with rounds of pp): (V − 1)·round + 2·(pp − 1 − rank)
    per_round = n_micro // max(1, n_micro // pp)
    factor = 1 if schedule == "InterleavedZeroBubble" else 2
    return min((virtual - 1) * per_round + factor * (pp - 1 - rank) + 1, n_micro * virtual)


# --- activations -----------------------------------------------------------------------------------
def layer_activation_terms(
    args: ModelArgs,
    tokens: int,
    keys: int,
    batch: int,
    tp: int,
    act_bytes: int,
    ac_mode: str,
    impl: Impl,
) -> dict[str, float]:
    """Bytes one Transformer block keeps for backward, for one micro-batch of `batch` sequences of
    `tokens` local query tokens attending to `keys` keys (CP: tokens = seq/cp, keys = seq)."""
    e, n, D, F = act_bytes, batch * tokens, args.dim, args.ffn_hidden_dim
    H, Kd = args.n_heads, args.n_kv_heads * args.head_dim  # type: ignore[operator]
    full = 1 if impl.tp_saves_gathered else tp  # divisor of tensors DTensor keeps at full sequence length
    if ac_mode == "full":  # only the block input, sequence-sharded (Korthikanti Table 2: 2sbh/t)
        return {"block input": e * n * D / tp}
    if ac_mode == "selective":  # herd's policy: keep matmul and attention outputs, recompute the rest
        return {
            "block input": e * n * D / tp,
            "wq/wk/wv outputs": e * n * (D + 2 * Kd) / tp,
            "attention out + logsumexp": (e * n * D + 4 * n * H) / tp,
            "wo/w2 outputs (pre reduce-scatter)": 2 * e * n * D / full,
            "w1/w3 outputs": 2 * e * n * F / tp,
        }
    if ac_mode != "none":
        raise ValueError(f"ac_mode must be one of {AC_MODES}, got {ac_mode!r}")
    t: dict[str, float] = {}
    if impl.kernels == "eager":  # x.float() (fp32) and the normalised x (act dtype), plus rstd, per norm
        t["RMSNorm ×2 (fp32 input, normed, rstd)"] = 2 * (4 * n * D + e * n * D + 4 * n) / tp
    elif impl.kernels == "fused":  # a fused RMSNorm keeps its input and rstd
        t["RMSNorm ×2 (input, rstd)"] = 2 * (e * n * D + 4 * n) / tp
    else:
        raise ValueError(f"kernels must be eager or fused, got {impl.kernels!r}")
    t["norm outputs (wq/wk/wv, w1/w3 inputs)"] = 2 * e * n * D / full
    if impl.attention_impl == "flash":  # q, k, v after RoPE (k, v gathered over CP), out, logsumexp
        t["q, k, v"] = e * (n * D + 2 * batch * keys * Kd) / tp
        t["attention out + logsumexp"] = (e * n * D + 4 * n * H) / tp
        if impl.document_mask:  # SDPA turns the bool mask into a float bias and keeps it, every layer
            t["dense attention mask"] = e * batch * tokens * keys
    elif impl.attention_impl == "math":  # q·scale, K and V expanded to H heads, softmax, out copy
        t["q·scale, K, V (H heads)"] = e * (n * D + 2 * batch * keys * D) / tp
        t["attention probabilities (T×S)"] = e * batch * (H // tp) * tokens * keys
        t["attention out (copy for wo)"] = e * n * D / tp
    else:
        raise ValueError(f"attention_impl must be flash or math, got {impl.attention_impl!r}")
    # SwiGLU: w1 out, silu(w1 out), w3 out, their product (eager); fused keeps w1/w3 outs + product
    t["SwiGLU"] = (4 if impl.kernels == "eager" else 3) * e * n * F / tp
    return t


def head_activation_bytes(args: ModelArgs, n: int, tp: int, act_bytes: int, impl: Impl) -> float:
    """Final norm + head + loss of one micro-batch of n tokens: the norm, the head input, fp32 log-probs."""
    D, e = args.dim, act_bytes
    norm = (4 * n * D + e * n * D + 4 * n) if impl.kernels == "eager" else (e * n * D + 4 * n)
    head_input = e * n * D / (1 if impl.tp_saves_gathered else tp)
    log_probs = 4 * n * args.vocab_size / (tp if impl.loss_parallel else 1)
    return norm / tp + head_input + log_probs


# --- memory ----------------------------------------------------------------------------------------
def estimate_memory(
    args: ModelArgs,
    layout: Any,
    seq_len: int,
    micro_batch: int = 1,
    n_microbatches: int = 1,
    ac_mode: str = "none",
    param_dtype: str = "bf16",
    reduce_dtype: str = "fp32",
    impl: Impl | None = None,
    reserve_bytes: float = 0.0,
    pp_rank: int | None = None,
) -> MemoryBreakdown:
    """Per-rank bytes of `layout` training `args` on `micro_batch` sequences of `seq_len` per DP rank and
    micro-batch, `n_microbatches` per optimizer step (pipeline micro-batches / gradient accumulation).

    Master weights, gradients and AdamW's two moments are fp32 (the paper's fp32 accumulation);
    activations are in `param_dtype` (FSDP's compute dtype). Returns the rank with the largest total
    (`pp_rank` picks one); the ranks 0, 1, pp−2, pp−1 bound the others."""
    lay, impl = Layout.of(layout), impl or Impl()
    if seq_len % lay.cp:
        raise ValueError(f"seq_len {seq_len} is not divisible by cp {lay.cp}")
    e, rb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[reduce_dtype]  # activations are in the compute dtype
    tokens, shards, V = seq_len // lay.cp, lay.fsdp_shards, lay.pp_virtual_stages
    n = micro_batch * tokens
    terms = layer_activation_terms(args, tokens, seq_len, micro_batch, lay.tp, e, ac_mode, impl)
    per_layer = sum(terms.values())
    no_ac = sum(layer_activation_terms(args, tokens, seq_len, micro_batch, lay.tp, e, "none", impl).values())
    from herd.parallel.pipeline import split_layers, stage_ids_for_rank  # torch: imported on use (see top)

    split = split_layers(args.n_layers, lay.pp * V, lay.pp_fewer_layers_on_ends)
    fsdp = shards > 1 or lay.dp_replicate > 1
    # bf16 params stay gathered without resharding, and under PP: torch's stages skip resharding
    # (and gradient reduction) between micro-batches (PipelineStage.backward_maybe_with_nosync)
    keep_gathered = fsdp and (not impl.reshard_after_forward or lay.pp > 1)
    accum_unsharded = fsdp and impl.unsharded_grad_accum and (n_microbatches > 1 or lay.pp > 1)
    ranks = sorted({0, 1, lay.pp - 2, lay.pp - 1} & set(range(lay.pp))) if pp_rank is None else [pp_rank]
    best: MemoryBreakdown | None = None
    for r in ranks:
        stage_ids = stage_ids_for_rank(r, lay.pp, V, lay.pp_schedule)
        first, last = 0 in stage_ids, lay.pp * V - 1 in stage_ids
        layers = sum(len(split[s]) for s in stage_ids)
        P = rank_params(args, lay, layers, first, last)
        unit = max(
            layer_params(args, lay.tp), (first or last) * math.ceil(args.vocab_size / lay.tp) * args.dim
        )
        params = 4 * P / shards + (e * P if keep_gathered or (not fsdp and e != 4) else 0)
        grads = 4 * P / shards + (rb * P if accum_unsharded else 0)  # + FSDP2's no-sync fp32 buffer
        in_flight = in_flight_chunks(lay.pp_schedule, lay.pp, V, r, n_microbatches) / V  # rank-layer units
        acts = in_flight * layers * per_layer + 8 * n * (first + last)  # + int64 token ids, labels
        if impl.document_mask and ac_mode != "none" and layers:
            acts += in_flight * micro_batch * tokens * seq_len  # the bool mask the checkpoints hold
        if last:
            heads = n_microbatches if lay.pp_schedule == "GPipe" and lay.pp > 1 else 1
            acts += heads * head_activation_bytes(args, n, lay.tp, e, impl)
        # transient: the largest of the momentary working sets (they happen at different times)
        vocab = args.vocab_size / (lay.tp if impl.loss_parallel else 1)
        loss_ws = (8 + (e if e < 4 else 0)) * n * vocab if last else 0.0  # fp32 grads of log-probs, logits
        recompute = {"none": 0.0, "full": no_ac, "selective": no_ac - per_layer}[ac_mode] if layers else 0.0
        transient = max(loss_ws + 4 * unit, recompute)  # 4·unit: a fresh fp32 grad before accumulation
        if fsdp:  # all-gathered params and unreduced grads of two units (current + prefetch)
            transient += 2 * unit * ((0 if keep_gathered else e) + (0 if accum_unsharded else rb))
        mb = MemoryBreakdown(
            params, grads, 8 * P / shards, acts, transient, reserve_bytes, r, layers, in_flight, terms
        )
        if best is None or mb.total > best.total:
            best = mb
    assert best is not None
    return best


# --- throughput ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EfficiencyModel:
    """Constants of `project_throughput` (docs/planner.md, "Calibration"): two are fitted to the paper's
    405B runs, the rest are H100-cluster figures and stated guesses."""

    gemm_efficiency: float = 0.58  # sustained fraction of peak in matmuls: fitted (8K, DP64 → 43% MFU)
    attention_efficiency: float = 0.72  # attention FLOPs relative to matmuls: fitted (131K, CP16 → 38%)
    intra_node_gbps: float = 360.0  # NVLink 4 bus bandwidth per GPU NCCL sustains (GB/s)
    inter_node_gbps: float = 45.0  # 400 Gb/s RoCE/InfiniBand per GPU, as sustained (GB/s)
    tp_exposed: float = 1.0  # SP all-gathers / reduce-scatters sit between matmuls: not overlapped
    cp_exposed: float = 1.0  # the K/V all-gather precedes attention
    pp_exposed: float = 0.25  # stage-to-stage sends are asynchronous (§3.3.2), mostly hidden
    dp_exposed: float = 0.1  # FSDP prefetches and reduces behind compute (why DP is outermost, §3.3.2)
    selective_recompute: float = 0.03  # re-running norms/SiLU/RoPE: memory-bound, a few % of compute


@dataclass
class Throughput:
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs (6N + 12·L·D·T per token, no recompute) / (time × peak)
    step_time_s: float
    n_microbatches: int
    bubble: float  # (pp − 1)/(V·M)
    seconds: dict[str, float]  # per step: compute, tp, cp, pp (in the pipeline), bubble, dp


def microbatches_per_step(layout: Layout, seq_len: int, global_batch_tokens: int, micro_batch: int) -> int:
    """Micro-batches each DP rank runs per optimizer step (CP ranks share a sequence)."""
    seqs, rem = divmod(global_batch_tokens, seq_len)
    if rem or seqs % (layout.dp * micro_batch):
        raise ValueError(
            f"{global_batch_tokens} tokens = {global_batch_tokens / seq_len:g} sequences of {seq_len} do not "
            f"split into DP {layout.dp} × micro-batches of {micro_batch}"
        )
    return seqs // (layout.dp * micro_batch)


def project_throughput(
    args: ModelArgs,
    layout: Any,
    seq_len: int,
    global_batch_tokens: int,
    micro_batch: int = 1,
    ac_mode: str = "none",
    peak_tflops: float = 989.0,
    eff: EfficiencyModel | None = None,
    param_dtype: str = "bf16",
    impl: Impl | None = None,
    gpus_per_node: int = 8,
) -> Throughput:
    """Projected tokens/s per GPU and MFU of one GPU's share of a step:
    (compute + exposed TP + CP communication) × (1 + bubble) + exposed FSDP communication."""
    lay, eff, impl = Layout.of(layout), eff or EfficiencyModel(), impl or Impl()
    M = microbatches_per_step(lay, seq_len, global_batch_tokens, micro_batch)
    e, peak = DTYPE_BYTES[param_dtype], peak_tflops * 1e12
    tokens = global_batch_tokens / lay.world  # every GPU does 1/world of the step's work
    attn = 12 * args.n_layers * args.dim * seq_len  # per token, as in ModelArgs.training_flops_per_token
    dense = args.training_flops_per_token(seq_len) - attn
    if ac_mode == "full":  # one more forward of the blocks (the head is not checkpointed)
        dense, attn = dense + 2 * args.n_layers * layer_params(args), attn * 4 / 3
    compute = tokens * (dense / eff.gemm_efficiency + attn / (eff.gemm_efficiency * eff.attention_efficiency))
    compute = compute / peak * (1 + (eff.selective_recompute if ac_mode == "selective" else 0))
    # Collectives per micro-batch of the rank's layers; bytes each GPU moves, over the link they use.
    n, layers = micro_batch * seq_len / lay.cp, args.n_layers / lay.pp
    passes = 3 if ac_mode == "full" else 2  # forward, backward (+ the recomputed forward)
    tp_bytes = M * layers * passes * 4 * (lay.tp - 1) / lay.tp * n * args.dim * e  # 2 AG + 2 RS a pass
    kv = 2 * micro_batch * seq_len * args.n_kv_heads * args.head_dim / lay.tp * e  # type: ignore[operator]
    cp_bytes = M * layers * passes * (lay.cp - 1) / lay.cp * kv  # gather K, V; reduce-scatter grads
    cp_bw = eff.intra_node_gbps if lay.tp * lay.cp <= gpus_per_node else eff.inter_node_gbps
    P = rank_params(args, lay, round(layers), lay.pp == 1, lay.pp == 1)
    gathers = 2 * M if impl.reshard_after_forward and lay.pp == 1 else 1
    reduces = 1 if impl.unsharded_grad_accum else M
    dp_bytes = (gathers * e + reduces * 4) * P * (lay.fsdp_shards - 1) / lay.fsdp_shards
    dp_bw = eff.intra_node_gbps if lay.world <= gpus_per_node else eff.inter_node_gbps
    pp_bytes = M * lay.pp_virtual_stages * 2 * n * args.dim * e / lay.tp if lay.pp > 1 else 0.0
    pp_bw = eff.intra_node_gbps if lay.tp * lay.cp * lay.pp <= gpus_per_node else eff.inter_node_gbps
    sec = {
        "compute": compute,
        "tp": eff.tp_exposed * tp_bytes / (eff.intra_node_gbps * 1e9),
        "cp": eff.cp_exposed * cp_bytes / (cp_bw * 1e9),
        "pp": eff.pp_exposed * pp_bytes / (pp_bw * 1e9),  # activations forward, gradients back
    }
    bubble = (lay.pp - 1) / (lay.pp_virtual_stages * M) if lay.pp > 1 else 0.0
    sec["bubble"] = bubble * sum(sec.values())
    sec["dp"] = eff.dp_exposed * dp_bytes / (dp_bw * 1e9)
    step = sum(sec.values())
    mfu = tokens * args.training_flops_per_token(seq_len) / (step * peak)
    return Throughput(tokens / step, mfu, step, M, bubble, sec)


# --- enumeration -----------------------------------------------------------------------------------
@dataclass
class Plan:
    layout: Layout
    ac_mode: str
    memory: MemoryBreakdown
    throughput: Throughput
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self) | {"memory": self.memory.to_dict()}
        d["layout"]["label"] = self.layout.label()
        return d


def pipeline_options(args: ModelArgs, pp: int, n_micro: int, virtual_stages: int | None) -> list[Layout]:
    """(pp, V, schedule, fewer-on-ends) choices that split the layers evenly and torch can run.

    Even: (n_layers + 2) divisible by pp·V with one layer fewer on the end stages (the paper's 405B
    split), else n_layers divisible by pp·V. V = 1 runs 1F1B, V ≥ 2 Interleaved1F1B."""
    if pp == 1:
        return [Layout()]
    if args.tie_embeddings:
        return []  # herd refuses tied embeddings under PP (herd.parallel.pipeline)
    from herd.parallel.pipeline import validate_pipeline_config  # torch: imported on use (see top)

    out = []
    for v in [virtual_stages] if virtual_stages else range(1, (args.n_layers + 2) // pp + 1):
        stages = pp * v
        if (args.n_layers + 2) % stages == 0:  # end stages may hold only the embedding / the head
            fewer = True
        elif args.n_layers % stages == 0:
            fewer = False
        else:
            continue
        schedule = "1F1B" if v == 1 else "Interleaved1F1B"
        try:
            validate_pipeline_config(schedule, pp, v, n_micro)
        except ValueError:
            continue
        out.append(Layout(pp=pp, pp_schedule=schedule, pp_virtual_stages=v, pp_fewer_layers_on_ends=fewer))
    return out


def evaluate_layout(
    args: ModelArgs,
    layout: Any,
    seq_len: int,
    global_batch_tokens: int,
    gpu_mem: float = math.inf,
    *,
    micro_batch: int = 1,
    ac_modes: tuple[str, ...] = AC_MODES,
    param_dtype: str = "bf16",
    impl: Impl | None = None,
    reserve_bytes: float = 3 * GiB,
    peak_tflops: float = 989.0,
    eff: EfficiencyModel | None = None,
    gpus_per_node: int = 8,
) -> Plan:
    """One layout's plan with the cheapest AC mode of `ac_modes` that fits (else the last one tried)."""
    lay = Layout.of(layout)
    n_micro = microbatches_per_step(lay, seq_len, global_batch_tokens, micro_batch)
    for ac in ac_modes:
        mem = estimate_memory(
            args, lay, seq_len, micro_batch, n_micro, ac, param_dtype, impl=impl, reserve_bytes=reserve_bytes
        )
        thr = project_throughput(
            args, lay, seq_len, global_batch_tokens, micro_batch, ac, peak_tflops, eff, param_dtype, impl,
            gpus_per_node,
        )  # fmt: skip
        if mem.total <= gpu_mem:
            break
    return Plan(lay, ac, mem, thr, mem.total <= gpu_mem)


def enumerate_layouts(
    world: int,
    gpu_mem: float,
    args: ModelArgs,
    seq_len: int,
    global_batch_tokens: int,
    *,
    virtual_stages: int | None = None,
    min_tokens_per_cp_rank: int = 1024,
    include_unfit: bool = False,
    **kw: Any,
) -> list[Plan]:
    """Every valid layout of `world` GPUs, with the cheapest AC mode of `ac_modes` that fits `gpu_mem`
    bytes, ranked by projected tokens/s per GPU (fitting plans first).

    Valid: tp a divisor of gpus_per_node (TP stays inside a node) dividing the heads, KV heads and FFN
    width; cp with seq_len divisible by 2·cp (load-balanced chunks) and ≥ `min_tokens_per_cp_rank`
    tokens per rank; an even pipeline split (`pipeline_options`); the global batch split into whole
    micro-batches per DP rank. `kw` go to `evaluate_layout` (micro_batch, gpus_per_node, ac_modes,
    param_dtype, impl, reserve_bytes, peak_tflops, eff)."""
    plans, micro_batch, gpus_per_node = list[Plan](), kw.get("micro_batch", 1), kw.get("gpus_per_node", 8)
    _divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    for tp in [t for t in _divisors(min(gpus_per_node, world)) if gpus_per_node % t == 0]:
        if any(x % tp for x in (args.n_heads, args.n_kv_heads, args.ffn_hidden_dim)):  # type: ignore[operator]
            continue
        if tp > 1 and args.tie_embeddings:
            continue  # herd.parallel.tensor_parallel refuses it
        for cp in _divisors(world // tp):
            if cp > 1 and (seq_len % (2 * cp) or seq_len // cp < min_tokens_per_cp_rank):
                continue
            for pp in _divisors(world // (tp * cp)):
                dp, batch = world // (tp * cp * pp), global_batch_tokens
                try:
                    n_micro = microbatches_per_step(Layout(dp_shard=dp), seq_len, batch, micro_batch)
                except ValueError:
                    continue
                for pipe in pipeline_options(args, pp, n_micro, virtual_stages):
                    lay = dataclasses.replace(pipe, tp=tp, cp=cp, dp_shard=dp)
                    plan = evaluate_layout(args, lay, seq_len, batch, gpu_mem, **kw)
                    if plan.fits or include_unfit:
                        plans.append(plan)
    plans.sort(key=lambda p: (not p.fits, -p.throughput.tokens_per_s_per_gpu, p.memory.total))
    return plans
