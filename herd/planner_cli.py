"""`herd plan`: rank every 4D layout of a model on N GPUs by projected throughput, with per-rank memory.

    herd plan --preset llama3_1_405b --gpus 8192 --seq-len 8192 --global-batch-tokens 16M --impl paper
    herd plan --config configs/text/llama3_8b.toml --gpus 64 --gpu-mem 80GB --top 5 --json

`--impl herd` (default) estimates this repository's code (eager ops unless `--compile`, DTensor TP with
full logits, FSDP2 no-sync gradient accumulation, dense document masks); `--impl paper` the paper's
stack. The numbers come from `herd.planner`, an analytic model (docs/planner.md), not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from herd.planner import (
    AC_MODES,
    EfficiencyModel,
    GiB,
    Impl,
    Layout,
    Plan,
    enumerate_layouts,
    evaluate_layout,
)


def parse_size(text: str) -> float:
    """'80GB' / '80GiB' / '80' → bytes. GPU "GB" are GiB: an "80 GB" H100 holds ~80 GiB."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}
    return float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s) * GiB


def parse_count(text: str) -> int:
    """'16M' tokens → 16·2^20 (the paper's "16M" batch is 2048 sequences of 8192), '4K' → 4096."""
    s = text.strip().upper().replace("_", "")
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `plan` on an `argparse` subparsers object; returns the new parser (func=run)."""
    p = subparsers.add_parser(
        "plan",
        help="per-rank memory and projected throughput of every 4D layout, ranked",
        description="Estimate per-GPU memory (params, grads, optimizer, activations, PP in-flight "
        "micro-batches) and projected tokens/s and MFU of every valid TP×CP×PP×DP layout, ranked.",
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
    # extra --section.key=value arguments override the --config file (herd.config.load_config)
    p.set_defaults(func=run, takes_overrides=True)
    return p


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """Model, shapes and implementation from --config or --preset, flags taking precedence."""
    from herd.text.args import get_preset

    out: dict[str, Any] = {"configured": None}
    if args.config:
        from herd.config import load_config

        cfg = load_config(args.config, getattr(args, "overrides", None) or [])
        model = get_preset(cfg.model.preset, **cfg.model.args)
        seq = args.seq_len or cfg.data.seq_len
        batch = args.global_batch_tokens or str(cfg.data.batch_size * seq * cfg.train.grad_accum)
        par = cfg.parallel
        dtype = args.dtype or (cfg.train.dtype if par.param_dtype == "auto" else par.param_dtype)
        ac = args.ac or par.activation_checkpoint
        impl = Impl.herd(par.compile or args.compile, par.fsdp_reshard_after_forward)
        try:
            lay = out["configured"] = Layout.of(par, world=args.gpus)
            # herd's trainer: batch_size sequences per micro-batch over all DP ranks, cut into
            # pp_microbatches pipeline micro-batches
            pieces = (par.pp_microbatches or lay.pp) if lay.pp > 1 else 1
            out["configured_micro_batch"] = max(1, cfg.data.batch_size // lay.dp // pieces)
        except (TypeError, ValueError) as e:
            print(f"{args.config}: parallel layout not usable on {args.gpus} GPUs: {e}", file=sys.stderr)
        name = cfg.model.preset
    else:
        if getattr(args, "overrides", None):
            raise SystemExit(f"herd plan: {' '.join(args.overrides)}: config overrides need --config")
        model, seq, name = get_preset(args.preset), args.seq_len or 8192, args.preset
        batch, dtype, ac = args.global_batch_tokens or "16M", args.dtype or "bf16", args.ac or "auto"
        impl = Impl.herd(args.compile)
    if args.impl == "paper":
        impl = Impl.paper()
    return out | dict(
        model=model, name=name, seq=seq, batch=parse_count(batch), dtype=dtype, ac=ac, impl=impl
    )


def _table(title: str, plans: list[Plan]) -> Any:
    from rich.table import Table

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


def run(args: argparse.Namespace) -> int:
    s = _setup(args)
    mem = parse_size(args.gpu_mem)
    kw: dict[str, Any] = dict(
        ac_modes=AC_MODES if s["ac"] == "auto" else (s["ac"],), param_dtype=s["dtype"], impl=s["impl"],
        reserve_bytes=parse_size(args.reserve), peak_tflops=args.peak_tflops, gpus_per_node=args.gpus_per_node,
    )  # fmt: skip
    plans = enumerate_layouts(
        args.gpus, mem, s["model"], s["seq"], s["batch"], virtual_stages=args.virtual_stages,
        include_unfit=args.all, micro_batch=args.micro_batch, **kw,
    )  # fmt: skip
    configured = None
    if s["configured"] is not None:
        try:
            mb = s["configured_micro_batch"]
            configured = evaluate_layout(
                s["model"], s["configured"], s["seq"], s["batch"], mem, micro_batch=mb, **kw
            )
        except ValueError as e:  # e.g. a batch that does not split over this world's DP degree
            print(f"configured layout {s['configured'].label()}: {e}", file=sys.stderr)
    if args.json:
        report = {
            "model": s["name"], "gpus": args.gpus, "gpu_mem_bytes": mem, "seq_len": s["seq"],
            "global_batch_tokens": s["batch"], "dtype": s["dtype"], "impl": dataclasses.asdict(s["impl"]),
            "efficiency": dataclasses.asdict(EfficiencyModel()),
            "configured": configured.to_dict() if configured else None,
            "plans": [p.to_dict() for p in plans[: args.top]],
        }  # fmt: skip
        print(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        console = Console(width=max(Console().width, 140))  # the table is wide; pipes default to 80
        what = (
            f"{s['name']} on {args.gpus} GPUs × {mem / GiB:g} GiB, seq {s['seq']}, {s['batch']:,} tokens/step"
        )
        if configured is not None:
            console.print(_table(f"configured layout: {what}", [configured]))
        console.print(
            _table(f"{what} ({args.impl} profile; a model, see docs/planner.md)", plans[: args.top])
        )
    if not any(p.fits for p in plans):
        print(
            f"no layout of {args.gpus} GPUs fits {args.gpu_mem}: add GPUs, AC or shorter sequences",
            file=sys.stderr,
        )
        return 1
    return 0


__all__ = ["add_parser", "run", "parse_size", "parse_count"]
