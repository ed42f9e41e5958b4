"""`herd convert`: Meta ⇄ Hugging Face checkpoint conversion from the command line.

    herd convert --from hf --to meta ./Llama-3.2-1B ./llama32-1b-meta --num-shards 1
    herd convert --to hf --dtype bf16 ./llama3-8b-meta ./llama3-8b-hf

`add_parser` registers the subcommand on the top-level CLI's subparsers and sets `func=run`.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `convert` on an `argparse` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Meta (params.json + consolidated.NN.pth) and Hugging Face layouts",
        description="Convert a Llama checkpoint between Meta and Hugging Face layouts, or reshard it.",
    )
    p.add_argument(
        "--from",
        dest="src_format",
        choices=("meta", "hf"),
        default=None,
        help="source layout (default: detected from the files)",
    )
    p.add_argument(
        "--to", dest="dst_format", choices=("meta", "hf"), required=True, help="destination layout"
    )
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (created)")
    p.add_argument(
        "--num-shards", type=int, default=1, help="model-parallel shards of a Meta destination (default 1)"
    )
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file of an HF destination (default 5GB)"
    )
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast the weights")
    p.add_argument("--overwrite", action="store_true", help="replace weights already in the destination")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Convert as `args` says and print a short summary; returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    from herd.text.loading import convert_checkpoint  # lazy: keeps `herd --help` fast

    result = convert_checkpoint(
        args.src,
        args.dst,
        src_format=args.src_format,
        dst_format=args.dst_format,
        num_shards=args.num_shards,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    table = Table(title="herd convert", show_header=False)
    table.add_row("format", f"{result.src_format} → {result.dst_format}")
    table.add_row("from", str(args.src))
    table.add_row("to", str(args.dst))
    table.add_row("tensors", f"{result.num_tensors:,}")
    table.add_row("params", f"{result.num_params:,}")
    table.add_row("files", ", ".join(f.name for f in result.files))
    table.add_row("copied", ", ".join(result.copied) or "—")
    table.add_row("seconds", f"{result.seconds:.2f}")
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m herd.text.convert_cli ...`) until the top-level CLI wires it in."""
    parser = argparse.ArgumentParser(prog="herd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
