"""`herd data tokenize`: jsonl / parquet / plain-text corpora → pre-tokenised memmap shards.

    herd data tokenize --source jsonl --input 'corpus/*.jsonl.gz' --out shards/web
    herd data tokenize --source parquet --input data/ --text-field content --out shards/code --workers 8

Rerunning the same command after a kill resumes after the last complete shard; training then reads the
directory with `data.source = "tokens"` (see docs/data_pipeline.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from herd.data.records import SkipCounter
from herd.data.training.text_sources import SOURCES, expand_paths, iter_documents
from herd.data.training.token_shards import DEFAULT_SHARD_TOKENS, MANIFEST, read_manifest, write_token_shards


def add_tokenize_parser(data_subparsers: Any) -> argparse.ArgumentParser:
    """Register `tokenize` under an existing `herd data` group (its `add_subparsers()` object)."""
    p = data_subparsers.add_parser(
        "tokenize",
        help="tokenise jsonl / parquet / text files into memory-mapped token shards (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--source", choices=SOURCES, required=True, help="input format")
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files, folders or quoted glob patterns (repeatable); .gz / .zst are decompressed",
    )
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or checkpoint dir (default: Llama 3)")
    p.add_argument("--text-field", default="text", help="jsonl key / parquet column holding the text")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="target tokens per shard")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"], help="token storage type")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="discard existing shards in --out")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    p.set_defaults(func=run)
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `data` command group (with `tokenize`) on the top-level `herd` subparsers."""
    data = subparsers.add_parser("data", help="data preparation: tokenize")
    add_tokenize_parser(data.add_subparsers(dest="data_command", required=True, metavar="COMMAND"))
    return data


def run(args: argparse.Namespace) -> int:
    """Tokenise as `args` says and print a summary; a setup error is one line on stderr and exit code 2."""
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"herd data tokenize: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from herd.text.tokenizer import load_tokenizer

    console = Console(stderr=True)
    files = expand_paths(args.source, args.input)  # fails on a typo before the tokenizer loads
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        before = 0 if args.overwrite else sum(s["num_tokens"] for s in read_manifest(args.out)["shards"])
    except FileNotFoundError:
        before = 0
    skipped = SkipCounter()
    inputs = {
        "source": args.source,
        "files": [str(f.resolve()) for f in files],
        "text_field": args.text_field if args.source != "text" else None,
    }
    start = time.perf_counter()
    manifest = write_token_shards(
        iter_documents(args.source, files, args.text_field, skipped),
        tokenizer,
        args.out,
        shard_tokens=args.shard_tokens,
        dtype=args.dtype,
        inputs=inputs,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        skipped=skipped,
    )
    seconds = time.perf_counter() - start
    new_tokens = manifest["num_tokens"] - before
    resumed = f" (resumed: {before:,} tokens were already done)" if before else ""
    console.print(
        f"{manifest['num_docs']:,} docs, {manifest['num_tokens']:,} tokens ({manifest['dtype']}) in "
        f"{len(manifest['shards'])} shard(s) → {args.out}/{MANIFEST}{resumed}\n"
        f"skipped records: {manifest['skipped_records']:,}; {seconds:.1f} s, "
        f"{new_tokens / max(seconds, 1e-9):,.0f} tokens/s",
        highlight=False,
        soft_wrap=True,  # one line per fact, even on a narrow or non-terminal stderr
    )
    if skipped.count and skipped.examples:
        console.print(f"[yellow]e.g. {skipped.examples[0]}", highlight=False, soft_wrap=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m herd.data.tokenize_cli data tokenize …`, usable before `herd` wires the group in."""
    parser = argparse.ArgumentParser(prog="herd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
