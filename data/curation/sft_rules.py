"""Rule-based cleaning of SFT dialogs (Llama 3 §4.2.3, "Data cleaning"): overused phrases and styles.

The paper removed or rebalanced responses with an overly apologetic tone ("I'm sorry", "I apologize")
and with excessive emojis or exclamation points. A rule here is one of

- `regex`: a pattern searched in the assistant messages (case-insensitive); the count is its matches;
- `emoji`: the number of emoji code points in the assistant messages;
- `exclamation`: the number of "!" in the assistant messages;

and a dialog *matches* when the count reaches `min_count`. Its action is `remove` (every matching dialog
goes) or `downsample`: matching dialogs are kept only up to `target_ratio` of the dialogs this rule
leaves, i.e. k = min(m, ⌊ratio · r / (1 − ratio)⌋) of the m matching ones, r the dialogs that do not
match, so k / (k + r) ≤ ratio with the largest such k. Which k survive is decided by a seeded hash of
(seed, rule, input ordinal): the same for a seed whatever the order or chunking of the input.
Rules apply one after another, each to what the previous ones left, so a down-sampling rule's ratio
holds in the stage's output only for rules after it: put removals first (as the defaults do).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Emoji blocks (pictographs, emoticons, transport, supplemental symbols, dingbats, flags) plus the
# miscellaneous symbols block; variation selectors and joiners are not counted on their own.
EMOJI = re.compile(
    "[\U0001f300-\U0001f5ff\U0001f600-\U0001f64f\U0001f680-\U0001f6ff\U0001f900-\U0001f9ff"
    "\U0001fa70-\U0001faff\U0001f1e6-\U0001f1ff\u2600-\u26ff\u2700-\u27bf]"
)
KINDS = ("regex", "emoji", "exclamation")
ACTIONS = ("remove", "downsample")


@dataclass
class Rule:
    name: str
    kind: str = "regex"
    pattern: str = ""  # for kind "regex"
    min_count: int = 1
    action: str = "remove"
    target_ratio: float = 0.0  # for "downsample": the largest share of matching dialogs kept

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"rule {self.name!r}: action {self.action!r} is not one of {', '.join(ACTIONS)}")
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError(f"rule {self.name!r}: a regex rule needs a pattern")
            try:
                self._regex = re.compile(self.pattern, re.IGNORECASE)
            except re.error as e:
                raise ValueError(f"rule {self.name!r}: bad pattern {self.pattern!r} ({e})") from None
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"rule {self.name!r}: target_ratio must be in [0, 1), got {self.target_ratio}")

    def count(self, text: str) -> int:
        if self.kind == "emoji":
            return len(EMOJI.findall(text))
        if self.kind == "exclamation":
            return text.count("!")
        return len(self._regex.findall(text))


# The paper's examples as defaults: emoji / exclamation floods removed, then apologies down-sampled to 5 %.
DEFAULT_RULES = (
    Rule("emoji", "emoji", min_count=3),
    Rule("exclamation", "exclamation", min_count=3),
    Rule("apology", "regex", r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|my apologies)\b",
         action="downsample", target_ratio=0.05),
)  # fmt: skip


def assistant_text(record: dict[str, Any]) -> str:
    return "\n".join(
        str(m.get("content", ""))
        for m in record["messages"]
        if isinstance(m, dict) and m.get("role") == "assistant"
    )


def keep_key(seed: int, rule: str, ordinal: int) -> int:
    """A seeded pseudo-random key of a dialog for one rule (64 bits of BLAKE2b)."""
    digest = hashlib.blake2b(f"{seed}:{rule}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def downsample_quota(matching: int, others: int, ratio: float) -> int:
    """The most matching dialogs k ≤ matching with k / (k + others) ≤ ratio."""
    if ratio <= 0.0:
        return 0
    return min(matching, math.floor(ratio * others / (1.0 - ratio) + 1e-9))


def apply_rules(
    examples: Sequence[Any], rules: Sequence[Rule], seed: int
) -> tuple[list[Any], list[tuple[Any, str, dict[str, Any]]], dict[str, Any]]:
    """(kept examples, [(removed example, reason, detail)], per-rule counts). An example has `.ordinal`
    and `.record` (a dialog dict)."""
    kept = list(examples)
    removed: list[tuple[Any, str, dict[str, Any]]] = []
    stats: dict[str, Any] = {}
    for rule in rules:
        counts = [rule.count(assistant_text(ex.record)) for ex in kept]
        hits = [i for i, c in enumerate(counts) if c >= rule.min_count]
        drop: set[int] = set(hits)
        if rule.action == "downsample":
            quota = downsample_quota(len(hits), len(kept) - len(hits), rule.target_ratio)
            ranked = sorted(hits, key=lambda i: keep_key(seed, rule.name, kept[i].ordinal))
            drop = set(ranked[quota:])
        reason = f"{'rule' if rule.action == 'remove' else 'downsampled'}:{rule.name}"
        for i in sorted(drop):
            removed.append((kept[i], reason, {"rule": rule.name, "count": counts[i]}))
        stats[rule.name] = {
            "matched": len(hits),
            "removed": len(drop),
            "kept_matching": len(hits) - len(drop),
        }
        kept = [ex for i, ex in enumerate(kept) if i not in drop]
    stats["removed"] = dict(Counter(reason for _, reason, _ in removed))
    return kept, removed, stats


def rules_from_config(items: Sequence[dict[str, Any]] | None) -> list[Rule]:
    """Rules from a config list of tables ([[rules]] in TOML); None: the defaults."""
    if items is None:
        return list(DEFAULT_RULES)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"rules[{i}]: expected a table with at least a name")
        unknown = set(item) - {"name", "kind", "pattern", "min_count", "action", "target_ratio"}
        if unknown:
            raise ValueError(f"rules[{i}] ({item['name']}): unknown key(s) {sorted(unknown)}")
        out.append(Rule(**item))
    return out
