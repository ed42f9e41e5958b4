"""`herd eval reward`: the reward model's scores of a policy's replies to a prompt set, as a distribution
(the paper compares models and quantizations this way, §6.2: FP8 vs BF16 reward distributions).

Each prompt (jsonl, `herd post sample`'s format: {"prompt"} or {"messages"}) gets one greedy reply from
the policy, and from the `baseline` policy when given, through `herd.sample.iter_rejection_samples` with
K = 1 (the one decode loop; the dialog + reply scored by `RewardModelScorer`, the score of the closing
`<|eot_id|>`). Bad prompt records, and prompts too long for a policy's context, are skipped and counted.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter


def summarize(rewards: list[float]) -> dict[str, float]:
    ordered = sorted(rewards)

    def quantile(q: float) -> float:  # linear interpolation between order statistics
        x = q * (len(ordered) - 1)
        lo = int(x)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)

    return {
        "count": len(rewards),
        "mean": statistics.fmean(rewards),
        "std": statistics.pstdev(rewards),
        "min": ordered[0],
        "p25": quantile(0.25),
        "median": quantile(0.5),
        "p75": quantile(0.75),
        "max": ordered[-1],
    }


def policy_rewards(
    policy: Any, tokenizer: Any, scorer: Any, dialogs: list[Any], max_new_tokens: int, batch: int
) -> tuple[list[str], list[float]]:
    """(greedy reply, reward) per dialog for one policy."""
    from herd.sample import iter_rejection_samples
    from herd.text.generation import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    replies: list[str] = [""] * len(dialogs)
    rewards: list[float] = [0.0] * len(dialogs)
    for i, record in iter_rejection_samples(
        policy, tokenizer, scorer, dialogs, 1, params, batch_prompts=batch
    ):
        replies[i], rewards[i] = record.responses[0].content, record.rewards[0]
    return replies, rewards


def run_reward_scores(
    model: str | Path,
    reward_model: str | Path,
    prompts: str | Path,
    out_dir: str | Path,
    baseline: str | Path | None = None,
    max_new_tokens: int = 64,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Writes `reward.json` (summary per policy, the model's win rate over the baseline), `reward.jsonl`
    (prompt, replies, rewards) and `reward.png` (the histograms, means dashed)."""
    from herd.data.training.prompts import read_prompts
    from herd.evaluation.plots import histogram
    from herd.sample import RewardModelScorer
    from herd.text.chat_format import ChatFormat
    from herd.text.loading import load_pretrained
    from herd.text.reward_model import load_reward_model

    skipped = SkipCounter()
    records = read_prompts(prompts, skipped)
    rm, rm_tokenizer = load_reward_model(reward_model, device=device)
    scorer = RewardModelScorer(rm, rm_tokenizer, batch_size)
    paths = {"model": model, **({"baseline": baseline} if baseline is not None else {})}
    policies = {name: load_pretrained(path, device=device) for name, path in paths.items()}
    chat = ChatFormat(rm_tokenizer)
    limit = min(m.args.max_seq_len for m, _ in policies.values())
    dialogs = []
    for where, messages in records:
        if len(chat.encode_dialog_prompt(messages, add_generation_prompt=True)) + max_new_tokens > limit:
            skipped.add("too_long", where, f"prompt + {max_new_tokens} new tokens exceed the context {limit}")
        else:
            dialogs.append((where, messages))
    if not dialogs:
        raise ValueError(f"{prompts}: no usable prompt ({dict(skipped.counts)})")
    messages_only = [m for _, m in dialogs]
    results = {name: policy_rewards(policy, tok, scorer, messages_only, max_new_tokens, batch_size)
               for name, (policy, tok) in policies.items()}  # fmt: skip
    report: dict[str, Any] = {name: summarize(r) for name, (_, r) in results.items()}
    if baseline is not None:
        pairs = list(zip(results["model"][1], results["baseline"][1]))
        report["win_rate"] = sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)  # ties count half
    report["skipped"] = dict(skipped.counts)
    report["skipped_examples"] = skipped.examples
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward.json").write_text(json.dumps(report, indent=2))
    with open(out / "reward.jsonl", "w") as f:
        for i, (where, messages) in enumerate(dialogs):
            row = {"where": where, "prompt": messages[-1].content}
            row.update({f"{name}_reply": r[0][i] for name, r in results.items()})
            row.update({f"{name}_reward": r[1][i] for name, r in results.items()})
            f.write(json.dumps(row) + "\n")
    histogram(
        {name: r for name, (_, r) in results.items()},
        out / "reward.png",
        "reward of greedy replies",
        "reward",
    )
    return report


__all__ = ["policy_rewards", "run_reward_scores", "summarize"]
