"""Generated SFT dialogs with known defects, to run and check `herd data curate-sft` (docs/curation.md).

Each dialog is a question of the synthetic preference set (`herd.data.synthetic.preferences`: arithmetic,
coloured-shape scenes, garbled replies) with one assistant reply, and a `defect` field saying what was
done to it, so a curation report can be read against the truth:

- `none`: the preferred (correct) reply;
- `wrong`: the rejected reply (a wrong sum, a wrong colour, shuffled words): a reward model trained on
  the preference set should score these lower;
- `apology`: the correct reply behind "I'm sorry, but" / "I apologize:" (rule: down-sample);
- `emoji`, `exclamation`: the correct reply with three emoji or "!!!" (rule: remove);
- `copy`: an exact copy of an earlier dialog (semantic dedup: cosine 1).

The `id` is `sft<index>`. Deterministic for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from herd.data.records import write_jsonl
from herd.data.synthetic.preferences import generate_preferences

# defect → share of the generated dialogs (the rest are `none`)
DEFAULT_MIX = {"wrong": 0.25, "apology": 0.15, "emoji": 0.05, "exclamation": 0.05, "copy": 0.1}
_APOLOGIES = ("I'm sorry, but ", "I apologize: ", "My apologies, ")
_EMOJI = ("😀", "🎉", "🔥", "✨", "👍")


def _dialog(prompt: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def generate_sft_dialogs(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """`n` dialog records ({"id", "messages", "defect", "kind"}) with the given share of each defect."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    if sum(mix.values()) > 1.0:
        raise ValueError(f"defect shares sum to {sum(mix.values())} > 1")
    rng = random.Random(seed)
    prefs = generate_preferences(n, seed=seed, heldout=True, edited_fraction=0.0)
    out: list[dict[str, Any]] = []
    for i, pref in enumerate(prefs):
        u, defect, acc = rng.random(), "none", 0.0
        for name, share in mix.items():
            acc += share
            if u < acc:
                defect = name
                break
        if defect == "copy" and not out:
            defect = "none"
        if defect == "copy":
            src = out[rng.randrange(len(out))]
            root = src.get("copy_of", src["id"])  # a copy of a copy names the original
            out.append({**src, "id": f"sft{i}", "defect": "copy", "copy_of": root})
            continue
        reply = pref["chosen"]
        if defect == "wrong":
            reply = pref["rejected"]
        elif defect == "apology":
            reply = rng.choice(_APOLOGIES) + reply[0].lower() + reply[1:]
        elif defect == "emoji":
            reply = reply + " " + "".join(rng.choice(_EMOJI) for _ in range(3))
        elif defect == "exclamation":
            reply = reply.rstrip(".") + "!!!"
        out.append({"id": f"sft{i}", "messages": _dialog(pref["prompt"], reply), "defect": defect,
                    "kind": pref["kind"]})  # fmt: skip
    return out


def write_sft_dialogs(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `generate_sft_dialogs(n, seed)` as jsonl; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, generate_sft_dialogs(n, seed))
    return path


def defect_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("defect", "none")] = counts.get(r.get("defect", "none"), 0) + 1
    return dict(sorted(counts.items()))
