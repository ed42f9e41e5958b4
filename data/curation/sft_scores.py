"""Quality and difficulty scores of SFT dialogs (Llama 3 §4.2.3, "Data pruning").

Quality
- Reward-model score: a `herd train rm` export scores each whole dialog (the reward of the `<|eot_id|>`
  closing its last assistant turn, `herd.sample.RewardModelScorer`); the top quartile (the ⌈n/4⌉ highest,
  ties broken by input order) is marked high quality. Its component of the quality score is the rank
  percentile (n − rank) / n ∈ (0, 1] (rank 0 = best), so scores of any scale combine.
- Judge (optional): a herd chat model answers the rubric (`sft_judge`): general dialogs on accuracy,
  instruction following and tone; code dialogs (a ``` fence, or `"category": "code"`) on bug
  identification and user intention, each 0/1. Its component is the fraction of criteria passed; all
  passed marks the dialog high quality. As in the paper, a dialog is high quality when either says so.
- quality_score = mean of the available components (1.0 when there are none).

Difficulty (judge only)
- Intent tags (Instag): the number of intents the judge lists, capped at `max_intents`; component
  min(n, cap) / cap.
- A 1–3 rating; component rating / 3.
- difficulty_score = mean of the available components (1.0 when there are none).

Unreadable judge replies are counted (`judge_unparsed/...`) and leave their component out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from herd.data.curation.sft_judge import (
    ChatJudge,
    difficulty_prompt,
    intents_prompt,
    parse_difficulty,
    parse_intents,
    parse_rubric,
    rubric_prompt,
)


@dataclass
class Scores:
    """Every score of one dialog; None where that scorer did not run or its reply was unreadable."""

    rm_score: float | None = None
    rm_percentile: float | None = None
    rm_top_quartile: bool = False
    rubric_kind: str | None = None
    rubric: dict[str, int] | None = None
    intents: list[str] | None = None
    difficulty_rating: int | None = None
    quality_score: float = 1.0
    quality_high: bool = False
    difficulty_score: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def is_code(record: dict[str, Any]) -> bool:
    if record.get("category") == "code":
        return True
    return any("```" in str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))


def rank_percentiles(values: Sequence[float]) -> tuple[list[float], list[bool]]:
    """((n − rank) / n per value, rank 0 the highest; whether it is among the ⌈n/4⌉ highest). Ties keep
    input order, so the result is a pure function of the values."""
    n = len(values)
    order = sorted(range(n), key=lambda i: (-values[i], i))
    rank = [0] * n
    for r, i in enumerate(order):
        rank[i] = r
    top = math.ceil(n / 4)
    return [(n - rank[i]) / n for i in range(n)], [rank[i] < top for i in range(n)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 1.0


def score_quality(
    records: Sequence[dict[str, Any]],
    messages: Sequence[list[Any]],
    scores: Sequence[Scores],
    reward_scorer: Any | None = None,
    judge: ChatJudge | None = None,
) -> dict[str, Any]:
    """Fill the quality fields of `scores` in place; returns the stage's counts."""
    stats: Counter = Counter()
    components: list[list[float]] = [[] for _ in scores]
    if reward_scorer is not None and scores:
        rewards = reward_scorer(list(messages))
        pct, top = rank_percentiles(rewards)
        for s, r, p, t, c in zip(scores, rewards, pct, top, components):
            s.rm_score, s.rm_percentile, s.rm_top_quartile = float(r), p, t
            c.append(p)
        stats["rm_scored"] = len(rewards)
        stats["rm_top_quartile"] = sum(top)
        stats["rm_truncated"] = getattr(reward_scorer, "truncated", 0)
    if judge is not None and scores:
        kinds = ["code" if is_code(r) else "general" for r in records]
        replies = judge.ask([rubric_prompt(m, k) for m, k in zip(messages, kinds)])
        for s, kind, reply, c in zip(scores, kinds, replies, components):
            s.rubric_kind, s.rubric = kind, parse_rubric(reply, kind)
            if s.rubric is None:
                stats[f"judge_unparsed/{kind}"] += 1
                continue
            passed = sum(s.rubric.values())
            c.append(passed / len(s.rubric))
            stats[f"judge_all_pass/{kind}"] += int(passed == len(s.rubric))
        stats["judge_scored"] = len(replies)
    for s, c in zip(scores, components):
        s.quality_score = _mean(c)
        s.quality_high = s.rm_top_quartile or (s.rubric is not None and all(s.rubric.values()))
    stats["high_quality"] = sum(s.quality_high for s in scores)
    return dict(stats)


def score_difficulty(
    messages: Sequence[list[Any]], scores: Sequence[Scores], judge: ChatJudge, max_intents: int = 5
) -> dict[str, Any]:
    """Fill intents / rating / difficulty_score of `scores` in place; returns the stage's counts."""
    stats: Counter = Counter()
    intents = judge.ask([intents_prompt(m) for m in messages])
    ratings = judge.ask([difficulty_prompt(m) for m in messages])
    for s, i_reply, r_reply in zip(scores, intents, ratings):
        comps = []
        s.intents = parse_intents(i_reply)
        if s.intents is None:
            stats["judge_unparsed/intents"] += 1
        else:
            comps.append(min(len(s.intents), max_intents) / max_intents)
        s.difficulty_rating = parse_difficulty(r_reply)
        if s.difficulty_rating is None:
            stats["judge_unparsed/difficulty"] += 1
        else:
            comps.append(s.difficulty_rating / 3)
            stats[f"rating/{s.difficulty_rating}"] += 1
        s.difficulty_score = _mean(comps)
    stats["judged"] = len(scores)
    return dict(stats)
