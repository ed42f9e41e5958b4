"""`herd convert`: Meta ⇄ Hugging Face checkpoint conversion, and export of training checkpoints (DCP).

    herd convert --from hf --to meta ./Llama-3.2-1B ./llama32-1b-meta --num-shards 1
    herd convert --to hf --dtype bf16 ./llama3-8b-meta ./llama3-8b-hf
    herd convert --from dcp --to hf runs/x/checkpoints/step-00001000 ./x-hf
    herd convert --to meta runs/x/checkpoints ./x-meta      # a run's newest complete checkpoint

Lives in `herd` rather than `herd.text`: reading DCP checkpoints needs torch.distributed, which model
code must not import. `add_parser` registers the subcommand on the top-level CLI and sets `func=run`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `convert` on an `argparse` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between Meta, Hugging Face and training (DCP) layouts",
        description="Convert a Llama checkpoint between Meta and Hugging Face layouts, reshard it, "
        "or export a training checkpoint (torch.distributed.checkpoint) to either.",
    )
    p.add_argument(
        "--from",
        dest="src_format",
        choices=("meta", "hf", "dcp"),
        default=None,
        help="source layout (default: detected from the files)",
    )
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
    p.set_defaults(func=run)
    return p


def _dcp_source(src: Path) -> Path | None:
    """The DCP checkpoint `src` names: itself (.metadata or herd.json), or a run's newest in a folder."""
    from herd.checkpoint import DCP_METADATA, META_FILE, list_checkpoints

    if (src / DCP_METADATA).is_file() or (src / META_FILE).is_file():
        return src
    found = list_checkpoints(src)
    return found[-1][1] if found else None


def convert_dcp(
    src: str | Path,
    dst: str | Path,
    dst_format: str = "hf",
    num_shards: int = 1,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Any:
    """Export the model of a training checkpoint to a Meta or Hugging Face directory (one process)."""
    from herd.checkpoint import load_dcp_model
    from herd.text.args import ModelArgs
    from herd.text.checkpoint_hf import save_hf_checkpoint
    from herd.text.checkpoint_meta import save_meta_checkpoint
    from herd.text.loading import ConvertResult, parse_dtype

    start = time.perf_counter()
    args_dict, sd = load_dcp_model(src)
    if not args_dict:
        raise ValueError(f"{src}: herd.json holds no model args; the checkpoint cannot be exported")
    args = ModelArgs(**args_dict)
    cast = parse_dtype(dtype)
    if cast is not None:
        sd = {k: v.to(cast) if v.is_floating_point() else v for k, v in sd.items()}
    if dst_format == "meta":
        files = save_meta_checkpoint(dst, args, sd, num_shards=num_shards, overwrite=overwrite)
    elif dst_format == "hf":
        if num_shards != 1:
            raise ValueError("num_shards applies to Meta checkpoints; use max_shard_size for Hugging Face")
        files = save_hf_checkpoint(dst, args, sd, max_shard_size, overwrite=overwrite)
    else:
        raise ValueError(f"cannot write format {dst_format!r} (expected 'meta' or 'hf')")
    return ConvertResult(
        src_format="dcp",
        dst_format=dst_format,
        num_tensors=len(sd),
        num_params=sum(t.numel() for t in sd.values()),
        seconds=time.perf_counter() - start,
        files=files,
    )


def run(args: argparse.Namespace) -> int:
    """Convert as `args` says and print a short summary; returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    from herd.text.loading import convert_checkpoint  # lazy: keeps `herd --help` fast

    src = Path(args.src)
    dcp_src = _dcp_source(src) if args.src_format in (None, "dcp") and src.is_dir() else None
    if args.src_format == "dcp" and dcp_src is None:
        raise SystemExit(f"herd convert: {src} is not a DCP checkpoint, nor a folder holding a complete one")
    if dcp_src is not None:
        src = dcp_src
        result = convert_dcp(
            src, args.dst, args.dst_format, args.num_shards, args.dtype, args.max_shard_size, args.overwrite
        )
    else:
        result = convert_checkpoint(
            src,
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
    table.add_row("from", str(src))
    table.add_row("to", str(args.dst))
    table.add_row("tensors", f"{result.num_tensors:,}")
    table.add_row("params", f"{result.num_params:,}")
    table.add_row("files", ", ".join(f.name for f in result.files))
    table.add_row("copied", ", ".join(result.copied) or "—")
    table.add_row("seconds", f"{result.seconds:.2f}")
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m herd.convert_cli ...`); `herd convert` is the usual one."""
    parser = argparse.ArgumentParser(prog="herd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
