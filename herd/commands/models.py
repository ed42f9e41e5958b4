"""`herd convert` and `herd plan`: a model's checkpoint layouts, and its parallel layouts on N GPUs.

    herd convert --from hf --to meta ./Llama-3.2-1B ./llama32-1b-meta --num-shards 1
    herd convert --to hf --dtype bf16 ./llama3-8b-meta ./llama3-8b-hf
    herd convert --from dcp --to hf runs/x/checkpoints/step-00001000 ./x-hf
    herd convert --to meta runs/x/checkpoints ./x-meta      # a run's newest complete checkpoint
    herd plan --preset llama3_1_405b --gpus 8192 --seq-len 8192 --global-batch-tokens 16M --impl paper
    herd plan --config configs/text/llama3_8b.toml --gpus 64 --gpu-mem 80GB --top 5 --json

Library functions: `herd.convert.convert` and `herd.job_plan.plan_job`. `herd plan --impl herd`
(default) estimates this repository's code (eager ops unless `--compile`, DTensor TP with full logits,
FSDP2 no-sync gradient accumulation, dense document masks); `--impl paper` the paper's stack.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from herd.commands.common import UsageError, warn
from herd.commands.registry import add_command


def cmd_convert(args: argparse.Namespace) -> int:
    """`herd.convert.convert`, then a table of what was converted."""
    from rich.console import Console
    from rich.table import Table

    from herd.convert import convert

    src, result = convert(
        src=args.src, dst=args.dst, dst_format=args.dst_format, src_format=args.src_format,
        num_shards=args.num_shards, max_shard_size=args.max_shard_size, dtype=args.dtype,
        overwrite=args.overwrite,
    )  # fmt: skip
    table = Table(title="herd convert", show_header=False)
    table.add_row("format", f"{result.src_format} → {result.dst_format}")
    table.add_row("from", str(src))
    table.add_row("to", str(args.dst))
    table.add_row("tensors", f"{result.num_tensors:,}")
    table.add_row("params", f"{result.num_params:,}")
    table.add_row("files", ", ".join(f.name for f in result.files))
    table.add_row("copied", ", ".join(result.copied) or "—")
    table.add_row("seconds", f"{result.seconds:.2f}")
    Console().print(table)
    return 0


def _plan_table(title: str, plans: list[Any]) -> Any:
    from rich.table import Table

    from herd.planner import GiB

    table = Table(title=title, caption="GiB per GPU on its most loaded rank; other = transient + reserve")
    for col in ("#", "layout", "AC", "M", "params", "grads", "optim", "activ.", "other", "total", "fits?"):
        table.add_column(col, justify="left" if col in ("layout", "AC") else "right", no_wrap=True)
    table.add_column("tok/s/GPU", justify="right")
    table.add_column("MFU", justify="right")
    for i, p in enumerate(plans, 1):
        m, t = p.memory, p.throughput
        gib = [f"{x / GiB:.1f}" for x in (m.params, m.grads, m.optimizer, m.activations)]
        table.add_row(
            str(i), p.layout.label(), p.ac_mode, str(t.n_microbatches), *gib,
            f"{(m.transient + m.reserve) / GiB:.1f}", f"{m.total / GiB:.1f}",
            "[green]yes" if p.fits else "[red]no", f"{t.tokens_per_s_per_gpu:,.0f}", f"{t.mfu:.1%}",
        )  # fmt: skip
    return table


def cmd_plan(args: argparse.Namespace) -> int:
    """`herd.job_plan.plan_job`, printed as tables (or JSON); exit status 1 when no layout fits."""
    from herd.job_plan import plan_job
    from herd.planner import GiB

    if args.overrides and not args.config:
        raise UsageError(f"{' '.join(args.overrides)}: config overrides need --config")
    report = plan_job(
        gpus=args.gpus, config=args.config, preset=args.preset, overrides=args.overrides, gpu_mem=args.gpu_mem,
        gpus_per_node=args.gpus_per_node, seq_len=args.seq_len, global_batch_tokens=args.global_batch_tokens,
        micro_batch=args.micro_batch, peak_tflops=args.peak_tflops, ac=args.ac, impl=args.impl,
        compile=args.compile, dtype=args.dtype, reserve=args.reserve, virtual_stages=args.virtual_stages,
        include_unfit=args.all,
    )  # fmt: skip
    for note in report.notes:
        warn(note)
    if args.json:
        print(json.dumps(report.to_dict(top=args.top), indent=2))
    else:
        from rich.console import Console

        console = Console(width=max(Console().width, 140))  # the table is wide; pipes default to 80
        what = (
            f"{report.name} on {report.gpus} GPUs × {report.gpu_mem_bytes / GiB:g} GiB, seq {report.seq_len}, "
            f"{report.global_batch_tokens:,} tokens/step"
        )
        if report.configured is not None:
            console.print(_plan_table(f"configured layout: {what}", [report.configured]))
        title = f"{what} ({args.impl} profile; a model, see docs/planner.md)"
        console.print(_plan_table(title, report.plans[: args.top]))
    if not report.any_fits:
        warn(f"no layout of {args.gpus} GPUs fits {args.gpu_mem}: add GPUs, AC or shorter sequences")
        return 1
    return 0


def _add_convert(sub: Any) -> None:
    p = add_command(
        sub,
        "convert",
        cmd_convert,
        help="convert a checkpoint between Meta, Hugging Face and training (DCP) layouts",
        description="Convert a Llama checkpoint between Meta and Hugging Face layouts, reshard it, "
        "or export a training checkpoint (torch.distributed.checkpoint) to either.",
    )
    p.add_argument(
        "--from", dest="src_format", choices=("meta", "hf", "dcp"), default=None,
        help="source layout (default: detected from the files)",
    )  # fmt: skip
    p.add_argument(
        "--to", dest="dst_format", choices=("meta", "hf"), required=True, help="destination layout"
    )
    p.add_argument("src", help="source checkpoint directory (for dcp also a run's checkpoints folder)")
    p.add_argument("dst", help="destination directory (created)")
    p.add_argument(
        "--num-shards", type=int, default=1, help="model-parallel shards of a Meta destination (default 1)"
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file of an HF destination (default 5GB)"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast the weights")
    p.add_argument("--overwrite", action="store_true", help="replace weights already in the destination")


def _add_plan(sub: Any) -> None:
    from herd.planner import AC_MODES

    p = add_command(
        sub,
        "plan",
        cmd_plan,
        help="per-rank memory and projected throughput of every 4D layout, ranked",
        description="Estimate per-GPU memory (params, grads, optimizer, activations, PP in-flight "
        "micro-batches) and projected tokens/s and MFU of every valid TP×CP×PP×DP layout, ranked. "
        "Extra --section.key=value arguments override the --config file.",
        takes_overrides=True,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="job TOML: model, seq_len, batch, AC mode, dtype, compile, layout")
    src.add_argument("--preset", help="model preset name (herd.text.args.PRESET_NAMES)")
    p.add_argument("--gpus", type=int, required=True, help="world size")
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU (default 80GB = 80 GiB)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the config's, else 8192")
    p.add_argument(
        "--global-batch-tokens", default=None, help="tokens per optimizer step, e.g. 16M (default: "
        "the config's batch_size × seq_len × grad_accum, else 16M)",
    )  # fmt: skip
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per DP rank")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense BF16 peak (H100 SXM: 989)")
    p.add_argument("--ac", choices=("auto", *AC_MODES), default=None, help="default: config's, else auto")
    p.add_argument("--impl", choices=("herd", "paper"), default="herd", help="implementation profile")
    p.add_argument("--compile", action="store_true", help="herd with torch.compile'd blocks")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="compute dtype (default bf16)")
    p.add_argument("--reserve", default="3GiB", help="CUDA context, NCCL, fragmentation (default 3GiB)")
    p.add_argument("--virtual-stages", type=int, default=None, help="fix V (default: every even split)")
    p.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    p.add_argument("--all", action="store_true", help="also list layouts that do not fit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(sub: Any) -> None:
    """Add `convert` and `plan` to the top-level subparsers."""
    _add_convert(sub)
    _add_plan(sub)
