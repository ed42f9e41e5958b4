"""`herd eval ...`: benchmarks and the paper's analyses of a checkpoint (docs/evaluation.md).

    herd eval lm --model runs/x/model --tasks tasks/arith_mc.yaml --out runs/x/eval     # lm-eval, offline
    herd eval robustness --model runs/x/model --data mc.jsonl --out runs/x/robust       # label/order/few-shot
    herd eval contamination --tasks mc.jsonl --corpus shards/ --tokenizer runs/x/model --out runs/x/contam
    herd eval vqa --model runs/quickstart/vision_model --data vqa.jsonl --out runs/x/vqa
    herd eval video-qa | asr --model DIR --data FILE.jsonl --out DIR
    herd eval reward --model runs/sft/model --reward-model runs/rm/model --prompts p.jsonl --out DIR

Python: `herd.evaluation.lm_harness.run_lm_eval`, `herd.evaluation.robustness.run_robustness`,
`herd.evaluation.contamination_job.run_contamination`, `herd.evaluation.multimodal.run_multimodal`,
`herd.evaluation.reward_scores.run_reward_scores`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from herd.commands.common import UsageError
from herd.commands.registry import add_command, add_group


def _print(summary: Any) -> None:
    print(json.dumps(summary, indent=2, default=str))


def cmd_lm(args: argparse.Namespace) -> int:
    """`herd.evaluation.lm_harness.run_lm_eval`: lm-evaluation-harness tasks from local files, offline."""
    from herd.evaluation.lm_harness import run_lm_eval

    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be positive, not {args.limit}")
    tasks = [t for entry in args.tasks for t in entry.split(",") if t]
    report = run_lm_eval(args.model, tasks, args.out, include_path=args.include_path,
                         num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                         device=args.device)  # fmt: skip
    if report.rank == 0:  # under torchrun rank 0 holds the gathered results
        _print({"out": str(report.out_dir), "metrics": report.metrics, "documents": report.samples,
                "ranks": report.world_size})  # fmt: skip
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    """`herd.evaluation.robustness.run_robustness`: accuracy under label sets, answer orders, few-shot labels."""
    from herd.evaluation.robustness import run_robustness

    _print(run_robustness(args.model, args.data, args.out, shots=args.shots, seed=args.seed,
                          batch_size=args.batch_size, device=args.device))  # fmt: skip
    return 0


def cmd_contamination(args: argparse.Namespace) -> int:
    """`herd.evaluation.contamination_job.run_contamination`: 8-gram overlap with a training corpus."""
    from herd.evaluation.contamination_job import run_contamination

    if not 0.0 < args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in (0, 1], not {args.threshold}")
    _print(run_contamination(args.tasks, args.corpus, args.out, tokenizer=args.tokenizer, model=args.model,
                             threshold=args.threshold, text_field=args.text_field,
                             batch_size=args.batch_size))  # fmt: skip
    return 0


def cmd_multimodal(args: argparse.Namespace) -> int:
    """`herd.evaluation.multimodal.run_multimodal`: VQA / video QA accuracy or ASR WER/CER per question type."""
    from herd.evaluation.multimodal import run_multimodal

    _print(run_multimodal(args.kind, args.model, args.data, args.out, device=args.device,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens))  # fmt: skip
    return 0


def cmd_reward(args: argparse.Namespace) -> int:
    """`herd.evaluation.reward_scores.run_reward_scores`: reward-model scores of a policy's responses."""
    from herd.evaluation.reward_scores import run_reward_scores

    _print(run_reward_scores(args.model, args.reward_model, args.prompts, args.out, baseline=args.baseline,
                             max_new_tokens=args.max_new_tokens, device=args.device,
                             batch_size=args.batch_size))  # fmt: skip
    return 0


def _common(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    if model_required:
        p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--out", required=True, help="folder for the JSON report (and plot)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)


def register(sub: Any) -> None:
    """Add the `eval` group: lm, robustness, contamination, vqa, video-qa, asr, reward."""
    group = add_group(sub, "eval", help="evaluate checkpoints: lm-eval tasks, robustness, contamination, "
                      "VQA / video QA / ASR scores, reward distributions")  # fmt: skip
    p = add_command(group, "lm", cmd_lm, help="lm-evaluation-harness tasks from local YAML/jsonl, offline")
    _common(p)
    p.add_argument("--tasks", action="append", required=True,
                   help="task names (comma-separated, repeatable) or task YAML files")  # fmt: skip
    p.add_argument("--include-path", default=None, help="a folder of task YAMLs to search")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--limit", type=int, default=None, help="documents per task (for a quick look)")

    p = add_command(group, "robustness", cmd_robustness,
                    help="multiple-choice accuracy under other label sets, answer orders and few-shot labels")  # fmt: skip
    _common(p)
    p.add_argument("--data", required=True, help='jsonl of {"question", "choices": [...], "answer": index}')
    p.add_argument("--shots", type=int, default=4, help="few-shot examples in the few-shot variants")
    p.add_argument("--seed", type=int, default=0)

    p = add_command(group, "contamination", cmd_contamination,
                    help="8-gram overlap of evaluation examples with a training corpus (Llama 3 §5.1)")  # fmt: skip
    _common(p, model_required=False)
    p.add_argument("--tasks", action="append", required=True,
                   help='jsonl: {"text"} or {"question", "choices", "answer"} records; repeatable, one per task')  # fmt: skip
    p.add_argument("--corpus", action="append", required=True,
                   help="token-shard folder (herd data tokenize) or jsonl files; repeatable")  # fmt: skip
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint folder or tokenizer file of the corpus (default: --model's, else Llama 3)")  # fmt: skip
    p.add_argument(
        "--model", default=None, help="score multiple-choice tasks: clean vs contaminated accuracy"
    )
    p.add_argument("--threshold", type=float, default=0.5, help="covered-token fraction that contaminates")
    p.add_argument("--text-field", default="text", help="text field of jsonl corpus records")

    for kind, what in (("vqa", "image"), ("video-qa", "video"), ("asr", "audio")):
        p = add_command(group, kind, cmd_multimodal, help=f"score a {what} checkpoint on a jsonl set")
        _common(p)
        p.add_argument("--data", required=True, help="jsonl records (see docs/evaluation.md)")
        p.add_argument("--max-new-tokens", type=int, default=16)
        p.set_defaults(kind=kind)

    p = add_command(
        group, "reward", cmd_reward, help="reward-model scores of a policy's responses (histogram)"
    )
    _common(p)
    p.add_argument("--reward-model", required=True, help="reward model folder (herd train rm)")
    p.add_argument("--prompts", required=True, help='jsonl of {"prompt"} (or {"messages"}) records')
    p.add_argument("--baseline", default=None, help="a second policy to compare (e.g. a quantized one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
