"""`herd data curate-sft`: SFT data cleaning, scoring and semantic dedup (paper §4.2.3), part of the `data`
family (registered by `herd.commands.data.register`); kept in its own module so that data.py stays small.

    herd data curate-sft --input dialogs.jsonl --out runs/curated --config configs/data/curate_sft.toml \\
        --reward-model runs/rm/model --judge runs/sft/model --embedder runs/sft/model

Library function: `herd.data.curation.sft_curation.curate_sft` (config: `load_curation_config`).
"""

from __future__ import annotations

import argparse
from typing import Any

from herd.commands.common import print_summary, require
from herd.commands.registry import add_command


def cmd_curate_sft(args: argparse.Namespace) -> int:
    """`herd.data.curation.sft_curation.curate_sft` with the models the config and options name."""
    from herd.data.curation.sft_curation import curate_sft, load_curation_config

    cfg = load_curation_config(
        args.config,
        **{
            "seed": args.seed, "device": args.device, "quality.reward_model": args.reward_model,
            "judge.model": args.judge, "dedup.embedder": args.embedder, "dedup.embedder_type": args.embedder_type,
            "dedup.threshold": args.threshold, "dedup.n_clusters": args.clusters,
            "progress": False if args.no_progress else None,
        },
    )  # fmt: skip
    if cfg.dedup.embedder:
        require("faiss")
    report = curate_sft(args.input, args.out, cfg)
    return print_summary(report, ("input_records", "output_records", "bad_records", "stages", "rejects"))


def add_curate_sft(group: Any) -> None:
    p = add_command(
        group,
        "curate-sft",
        cmd_curate_sft,
        help="clean, score and semantically dedup SFT dialogs (rules, RM / judge quality, difficulty)",
        description="Rule-based cleaning, reward-model and judge quality scores, judge difficulty scores and "
        "semantic dedup of dialog jsonl (Llama 3 §4.2.3); writes curated.jsonl, rejects.jsonl (every removed "
        "dialog with its stage and reason) and report.json to --out (docs/curation.md).",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="dialog jsonl files, in order")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--config", metavar="TOML", help="[[rules]], [quality], [judge], [difficulty], [dedup]")
    p.add_argument("--reward-model", metavar="DIR", help="a `herd train rm` export: quality score")
    p.add_argument("--judge", metavar="DIR", help="a herd chat checkpoint: rubric, intents, difficulty")
    p.add_argument("--embedder", metavar="DIR", help="herd checkpoint or local HF encoder: semantic dedup")
    p.add_argument("--embedder-type", choices=["herd", "hf"], default=None, help="default: herd")
    p.add_argument("--threshold", type=float, default=None, help="dedup cosine threshold (default 0.9)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default ⌈√n⌉)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    p.add_argument("--no-progress", action="store_true")
