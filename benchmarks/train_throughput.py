"""Training throughput of herd's loop (tokens/s, MFU, peak memory) for a preset and layout, printed as
JSON; optionally beside Hugging Face transformers' LlamaForCausalLM on the same config and batches.

    python benchmarks/train_throughput.py --preset tiny --seq-len 256 --batch-size 8 --steps 10
    torchrun --nproc_per_node 8 benchmarks/train_throughput.py --preset llama3_2_1b --seq-len 8192 \\
        --batch-size 8 --dtype bf16 --set parallel.dp_shard=8 --peak-tflops 989 --compare-hf
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch
import torch.nn.functional as F

from herd.config import load_config
from herd.parallel.launch import init_distributed, run_in_fresh_process
from herd.plans.llama import LLAMA_PLAN
from herd.task import LAYOUT_DIMS, TaskBase
from herd.tasks.text import CausalLMObjective
from herd.text.args import get_preset
from herd.text.model import Llama
from herd.trainer import peak_memory_gib, train


class RandomTokensTask(CausalLMObjective, TaskBase):
    """Uniform random tokens: throughput does not depend on the text. One document per row, so attention
    takes SDPA's causal fast path (no explicit document mask)."""

    name = "bench-text"
    layouts = frozenset(LAYOUT_DIMS)
    plan = LLAMA_PLAN

    def __init__(self, args, seq_len: int, batch_size: int, seed: int = 0) -> None:
        self.model_args, self.seq_len, self.batch_size, self.seed = args, seq_len, batch_size, seed

    def build_model(self):
        with torch.device("meta"):
            return Llama(self.model_args)

    def init_weights(self, model) -> None:
        model.init_weights()

    def train_batches(self, rank: int, world_size: int):
        g = torch.Generator().manual_seed(self.seed + rank)
        local = self.batch_size // world_size
        while True:
            tokens = torch.randint(0, self.model_args.vocab_size, (local, self.seq_len + 1), generator=g)
            docs = torch.zeros(local, self.seq_len, dtype=torch.long)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "document_ids": docs}

    def inputs(self, batch: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        positions = batch.get("positions")  # context parallelism's chunks
        return (batch["tokens"],), ({} if positions is None else {"positions": positions})

    def flops_per_target(self) -> float:
        return self.model_args.training_flops_per_token(self.seq_len)

    def export(self, state_dict, out_dir, fmt="meta"):
        return None  # a benchmark keeps no model


def bench_herd(a: argparse.Namespace) -> dict[str, Any]:
    overrides = [f"--train.steps={a.warmup + a.steps}", f"--train.dtype={a.dtype}", "--train.eval_every=0",
                 "--metrics.log_every=1", "--metrics.tensorboard=false", "--checkpoint.save_final=false",
                 "--checkpoint.resume=none", f"--train.run_dir={a.run_dir}", f"--train.device={a.device}",
                 *(f"--{kv}" for kv in a.set)]  # fmt: skip
    if a.compile:
        overrides.append("--parallel.compile=true")
    cfg = load_config(None, overrides)
    args = get_preset(a.preset, **({"max_seq_len": max(a.seq_len, get_preset(a.preset).max_seq_len)}))
    task = RandomTokensTask(args, a.seq_len, a.batch_size)
    result = train(cfg, task, show_progress=False)
    timed = [h for h in result.history if h["step"] > a.warmup]
    tps = sum(h["targets_per_s"] for h in timed) / len(timed)
    world = result.runtime.world
    out = {"impl": "herd", "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
           "peak_mem_gib": peak_memory_gib(result.runtime.device), "world_size": world,
           "layout": {k: getattr(result.runtime.dims, k) for k in ("dp_replicate", "dp_shard", "cp", "pp", "tp")}}  # fmt: skip
    if a.peak_tflops:
        out["mfu"] = tps * task.flops_per_target() / world / (a.peak_tflops * 1e12)
    return out


def bench_hf(a: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """transformers' LlamaForCausalLM, same architecture, same AdamW and batches, one device."""
    import transformers

    from herd.text.checkpoint_hf import hf_config_from_args

    args = get_preset(a.preset)
    config = transformers.LlamaConfig(**hf_config_from_args(args))
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = transformers.LlamaForCausalLM(config).to(device)
    if a.hf_gradient_checkpointing:  # whole-layer recomputation: the only policy transformers offers
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1, foreach=True
    )
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(a.warmup + a.steps):
        tokens = torch.randint(0, args.vocab_size, (a.batch_size, a.seq_len + 1), generator=g).to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    tps = a.batch_size * a.seq_len / (sum(times) / len(times))
    out = {"impl": "transformers", "version": transformers.__version__, "tokens_per_s": tps,
           "peak_mem_gib": peak_memory_gib(device), "gradient_checkpointing": a.hf_gradient_checkpointing}  # fmt: skip
    if a.peak_tflops:
        out["mfu"] = tps * args.training_flops_per_token(a.seq_len) / (a.peak_tflops * 1e12)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step over all DP ranks")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="per device (H100 bf16 dense: 989)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. parallel.tp=2")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers on one device")
    p.add_argument(
        "--hf-gradient-checkpointing", action="store_true", help="transformers recomputes each layer"
    )
    p.add_argument("--run-dir", default="runs/bench")
    a = p.parse_args()
    rank, _, device = init_distributed()
    results = {"preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size, "dtype": a.dtype,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "runs": [bench_herd(a)]}  # fmt: skip
    if a.compare_hf and rank == 0:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results["runs"].append(run_in_fresh_process(bench_hf, a, device))  # memory of its own
    if rank == 0:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
