"""Pipeline-parallel inference: throughput and latency with 1 vs 2 (and more) micro-batches in flight
(paper §6.1's trade-off plot), on gloo CPU ranks or NCCL GPUs.

    python benchmarks/pipeline_inference.py --pp 2 --microbatches 1,2 --out runs/pp_infer       # CPU, gloo
    torchrun --nproc-per-node 2 benchmarks/pipeline_inference.py --preset llama3_8b --dtype bf16 \
        --device cuda --batch 16 --prompt-len 4096 --new-tokens 256 --out runs/pp_infer          # GPUs

For each micro-batch count M, rank 0 generates `--new-tokens` greedy tokens for `--batch` random prompts
of `--prompt-len` tokens through `herd.parallel.pipeline_inference` (median of --repeats after a warm-up).
throughput = batch·(prompt + new) / time (tokens/s); latency = time per generated token of a request
(time / new tokens, prefill included). Writes `<out>/pipeline_inference.json` and `.png` (throughput
against latency, one point per M) and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from herd.parallel.launch import spawn_ranks
from herd.parallel.pipeline_inference import (
    PipelinedModel,
    build_inference_stage,
    generate_pipelined,
    serve_stage,
)
from herd.plans.llama import LLAMA_PLAN
from herd.text import build_llama, get_preset
from herd.text.generation import SamplingParams, generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(a: argparse.Namespace) -> list[dict] | None:
    torch.set_num_threads(a.threads)
    overrides = {
        k: v for k, v in {"dim": a.dim, "n_layers": a.n_layers, "vocab_size": a.vocab_size}.items() if v
    }
    args = get_preset(a.preset, **overrides, max_seq_len=a.prompt_len + a.new_tokens + 1)
    torch.manual_seed(0)
    model = build_llama(args, device=a.device, dtype=DTYPES[a.dtype]).eval()
    stage = build_inference_stage(model, LLAMA_PLAN, dist.get_world_size(), dist.get_rank())
    del model
    if dist.get_rank() != 0:
        serve_stage(stage)
        return None
    piped = PipelinedModel(stage)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, args.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    params = SamplingParams(max_new_tokens=a.new_tokens)
    rows = []
    try:
        for m in [int(x) for x in a.microbatches.split(",")]:
            generate_pipelined(piped, prompts, m, generate, params=params)  # warm-up
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                generate_pipelined(piped, prompts, m, generate, params=params)
                times.append(time.perf_counter() - t)
            sec = sorted(times)[len(times) // 2]
            rows.append({"microbatches": m, "seconds": round(sec, 3),
                         "throughput_tokens_per_s": round(a.batch * (a.prompt_len + a.new_tokens) / sec, 1),
                         "latency_ms_per_token": round(sec / a.new_tokens * 1e3, 2)})  # fmt: skip
    finally:
        piped.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", default="1,2")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--out", default="runs/pipeline_inference")
    a = p.parse_args()
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        from herd.parallel.launch import init_distributed

        init_distributed()
        rows = run(a)
    else:
        rows = spawn_ranks(run, a.pp, a, timeout_s=3600)[0]
    if rows is None:
        return
    report = {"pp": a.pp, "preset": a.preset, "dim": a.dim, "n_layers": a.n_layers, "dtype": a.dtype,
              "device": a.device, "batch": a.batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
              "threads_per_rank": a.threads, "results": rows}  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_inference.json").write_text(json.dumps(report, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    xs = [r["latency_ms_per_token"] for r in rows]
    ys = [r["throughput_tokens_per_s"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['microbatches']} micro-batch{'es' if r['microbatches'] > 1 else ''}", (x, y))
    ax.set_xlabel("latency (ms per generated token)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(f"pipeline inference, pp={a.pp}, batch {a.batch}")
    fig.tight_layout()
    fig.savefig(out / "pipeline_inference.png", dpi=120)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
