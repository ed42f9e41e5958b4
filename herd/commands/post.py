"""`herd post ...`: the post-training steps that are not a training run (paper §4; Llama 2 §3).

    herd post sample --policy runs/sft/model --reward-model runs/rm/model --prompts p.jsonl --out best.jsonl
    herd post gatt --model runs/sft/model --dialogs d.jsonl --instructions i.txt --out gatt.jsonl
    herd post average runs/rm-a/model runs/rm-b/model --out runs/rm-avg [--weights 2 1]
    herd post dpo-reference --reference runs/sft/model prefs.jsonl prefs_ref.jsonl

Each mirrors one library function: `herd.sample.rejection_sample_file`,
`herd.data.curation.ghost_attention.gatt_from_files`, `herd.average.average_to_dir`,
`herd.tasks.dpo.precompute_reference_logps`. The objectives themselves train with `herd train sft|rm|dpo|ppo`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from herd.commands.common import UsageError, warn
from herd.commands.registry import add_command, add_group

SAMPLE_SUMMARY = ("prompts", "skipped", "k", "out", "mean_best_reward", "mean_reward", "seconds")


def cmd_sample(args: argparse.Namespace) -> int:
    """`herd.sample.rejection_sample_file`; warnings on stderr, the summary as JSON on stdout."""
    from rich.console import Console

    from herd.sample import rejection_sample_file

    summary = rejection_sample_file(
        policy=args.policy, reward_model=args.reward_model, prompts=args.prompts, out=args.out, k=args.k,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        batch_prompts=args.batch_prompts, rm_batch_size=args.rm_batch_size, device=args.device,
        dtype=args.dtype,
    )  # fmt: skip
    if summary["skipped"]:
        warn(f"skipped {summary['skipped']} bad prompt record(s), e.g. {summary['skipped_examples'][0]}")
    if summary["truncated"]:
        warn(f"{summary['truncated']} dialog(s) longer than the reward model's context were cut")
    Console().print_json(json.dumps({k: summary[k] for k in SAMPLE_SUMMARY}))
    return 0


def cmd_gatt(args: argparse.Namespace) -> int:
    """`herd.data.curation.ghost_attention.gatt_from_files`; one line saying what was written."""
    from herd.data.curation.ghost_attention import gatt_from_files

    written, skipped = gatt_from_files(
        model=args.model, dialogs=args.dialogs, instructions=args.instructions, out=args.out,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
        placement=args.placement, device=args.device,
    )  # fmt: skip
    if skipped.count:
        warn(f"herd post gatt: skipped {skipped.count} dialog(s), e.g. {skipped.examples[0]}")
    print(f"wrote {written} GAtt dialog(s) to {args.out}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    """`herd.average.average_to_dir`; a table of the inputs, their weights and what was written."""
    from rich.console import Console
    from rich.table import Table

    from herd.average import average_to_dir

    out = Path(args.out).resolve()
    if any(Path(c).resolve() == out for c in args.checkpoints):
        raise UsageError(f"--out {args.out} is one of the inputs")
    report = average_to_dir(
        checkpoints=args.checkpoints, out=args.out, weights=args.weights, overwrite=args.overwrite
    )
    table = Table(title=f"herd average of {len(args.checkpoints)} checkpoints", show_header=False)
    for path, w in zip(args.checkpoints, report["weights"]):
        table.add_row(str(path), f"weight {w:.4f}")
    table.add_row("to", report["out"])
    table.add_row("tensors", f"{report['tensors']:,}")
    table.add_row("params", f"{report['params']:,}")
    table.add_row("files", ", ".join(report["files"]))
    table.add_row("seconds", f"{report['seconds']:.2f}")
    Console().print(table)
    return 0


def cmd_dpo_reference(args: argparse.Namespace) -> int:
    """`herd.tasks.dpo.precompute_reference_logps`; one line saying what was written."""
    from herd.tasks.dpo import precompute_reference_logps

    n, skipped = precompute_reference_logps(
        reference=args.reference, in_path=args.input, out_path=args.output, seq_len=args.seq_len,
        mask_format_tokens=not args.no_mask_format_tokens, batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    note = f"; skipped {skipped.count} bad record(s), e.g. {skipped.examples[0]}" if skipped.count else ""
    print(f"wrote {n} records with reference log-probs to {args.output}{note}")
    return 0


def _add_sample(group: Any) -> None:
    p = add_command(
        group,
        "sample",
        cmd_sample,
        help="rejection sampling: K replies per prompt, keep the reward model's best (SFT data)",
        description="Draw K replies per prompt from a policy (shared-prefix KV cache), score them with "
        "a reward model and write the best as SFT-ready jsonl (Llama 3 §4.2.2).",
    )
    p.add_argument("--policy", required=True, help="policy checkpoint directory (Meta or HF layout)")
    p.add_argument("--reward-model", required=True, help="reward model directory (`herd train rm` export)")
    p.add_argument("--prompts", required=True, help='jsonl of {"messages": [...]} or {"prompt": "..."}')
    p.add_argument("--out", required=True, help="output jsonl (overwritten)")
    p.add_argument("--k", type=int, default=10, help="replies per prompt (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="default 1.0: the K replies come from the policy's own distribution, diverse enough for "
        "the best of K to beat the typical one; 0 makes all K identical",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="default 1.0 (the reward model filters the tail)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: reproducible runs)")
    p.add_argument("--batch-prompts", type=int, default=1, help="prompts decoded together (N·K rows)")
    p.add_argument("--rm-batch-size", type=int, default=16, help="dialogs per reward-model forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="policy dtype")


def _add_gatt(group: Any) -> None:
    p = add_command(
        group,
        "gatt",
        cmd_gatt,
        help="build Ghost Attention (multi-turn instruction following) SFT data with a chat model",
        description="Llama 2 §3.3: draw an instruction per dialog, re-sample every assistant turn with the "
        "model on the dialog with the instruction in every user turn, write the dialogs with the "
        "instruction in the first turn only and loss on the last answer only (SFT jsonl).",
    )
    p.add_argument("--model", required=True, help="chat checkpoint directory (Meta or Hugging Face layout)")
    p.add_argument("--dialogs", required=True, help='jsonl of {"messages": [user, assistant, ...]} dialogs')
    p.add_argument("--instructions", required=True, help="text file, one system instruction per line")
    p.add_argument("--out", required=True, help="output SFT jsonl (for `herd train sft`)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--placement", choices=("user", "system"), default="user", help="where the instruction stays"
    )
    p.add_argument("--device", default="cpu")


def _add_average(group: Any) -> None:
    p = add_command(
        group,
        "average",
        cmd_average,
        help="average checkpoints of one architecture (RM / SFT / DPO runs), written in Meta layout",
        description="Weighted or uniform average of checkpoint directories (Meta or Hugging Face layout) "
        "with identical architectures; the tokenizer files come from the first one.",
    )
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories")
    p.add_argument("--out", required=True, help="destination directory (Meta layout)")
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one per checkpoint, normalised (default uniform)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace weights already in --out")


def _add_dpo_reference(group: Any) -> None:
    p = add_command(
        group,
        "dpo-reference",
        cmd_dpo_reference,
        help="add the reference model's log-probs to a preference jsonl (DPO then needs no second model)",
    )
    p.add_argument("--reference", required=True, help="reference checkpoint (the DPO run's model.init_from)")
    p.add_argument("input", help="preference jsonl")
    p.add_argument("output", help="jsonl to write, with ref_chosen_logp / ref_rejected_logp added")
    p.add_argument("--seq-len", type=int, default=None, help="skip longer records (default: the model's max)")
    p.add_argument(
        "--no-mask-format-tokens",
        action="store_true",
        help="count template tokens (dpo.mask_format_tokens=false)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


def register(sub: Any) -> None:
    """Add the `post` family to the top-level subparsers."""
    group = add_group(
        sub, "post", "rejection sampling, GAtt data, checkpoint averaging, DPO reference log-probs"
    )
    for add in (_add_sample, _add_gatt, _add_average, _add_dpo_reference):
        add(group)
