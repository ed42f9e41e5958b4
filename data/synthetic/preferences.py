"""Synthetic preference data with known ground truth, for tests, docs and the CPU example (Llama 2 §3.2.1).

Every word lies in the vocabulary of `herd.data.synthetic.text` (the quickstart's corpus), so a tiny model
pretrained on that corpus, with a vocabulary subset built from it, can read it without unknown tokens.
Three kinds of record, each with a `strength` that follows how obvious the preference is, so Llama 2's
margin has something to work with:

- arithmetic: "Question: what is 3 plus 4?" → chosen "3 plus 4 is 7." vs rejected "3 plus 4 is 9.";
  the strength grows with the size of the error (off by ≥5: significantly better, 3–4: better,
  2: slightly better, 1: negligibly better / "unsure");
- scene: a described scene and a question about it → the right colour/shape vs one from elsewhere in the
  scene (better);
- garbled: the right reply vs the same words shuffled after the first (significantly better).

A fraction of records has an `edited` reply (Llama 3 §4.2.1), so the ranking is edited > chosen >
rejected: in arithmetic the chosen reply becomes a terse "7." and the complete sentence is the edit; in
scenes the edit adds the evidence ("The circle is red. There is a red circle.").
Held-out split: arithmetic questions whose (a + 2b) mod 5 == 0 (20 of the 100 sums) and scenes from a
different seed never appear in training; the reward model must generalise what it read in pretraining.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from herd.data.synthetic.text import COLORS, SHAPES
from herd.data.training.preferences import write_preferences

KINDS = ("arithmetic", "scene", "garbled")


def is_heldout_sum(a: int, b: int) -> bool:
    return (a + 2 * b) % 5 == 0


def arithmetic_strength(error: int) -> str:
    error = abs(error)
    if error >= 5:
        return "significantly_better"
    if error >= 3:
        return "better"
    return "slightly_better" if error == 2 else "negligibly_better"


def _sum_question(rng: random.Random, heldout: bool) -> tuple[int, int]:
    while True:
        a, b = rng.randrange(10), rng.randrange(10)
        if is_heldout_sum(a, b) == heldout:
            return a, b


def _arithmetic(rng: random.Random, heldout: bool, edited_fraction: float) -> dict[str, Any]:
    a, b = _sum_question(rng, heldout)
    right = a + b
    wrong = rng.choice([w for w in range(19) if w != right])
    record: dict[str, Any] = {
        "prompt": f"Question: what is {a} plus {b}?",
        "chosen": f"{a} plus {b} is {right}.",
        "rejected": f"{a} plus {b} is {wrong}.",
        "strength": arithmetic_strength(wrong - right),
        "kind": "arithmetic",
    }
    if record["strength"] == "negligibly_better" and rng.random() < 0.3:
        record["strength"] = "unsure"  # Llama 2's annotators' fourth option, read as negligibly better
    if rng.random() < edited_fraction:
        record["edited"], record["chosen"] = record["chosen"], f"{right}."
    return record


def _scene(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    n = rng.randint(2, 3)
    colors, shapes = rng.sample(COLORS, n), rng.sample(SHAPES, n)
    objects = list(zip(colors, shapes))
    return " ".join(f"There is a {c} {s}." for c, s in objects), objects


def _scene_question(rng: random.Random, edited_fraction: float) -> dict[str, Any]:
    scene, objects = _scene(rng)
    (c, s), (c2, s2) = rng.sample(objects, 2)
    if rng.random() < 0.5:
        question, chosen, rejected = f"What color is the {s}?", f"The {s} is {c}.", f"The {s} is {c2}."
    else:
        question, chosen, rejected = (
            f"What shape is the {c} object?",
            f"The {c} object is a {s}.",
            f"The {c} object is a {s2}.",
        )
    record: dict[str, Any] = {"prompt": f"{scene} Question: {question}", "chosen": chosen, "rejected": rejected,
                              "strength": "better", "kind": "scene"}  # fmt: skip
    if rng.random() < edited_fraction:
        record["edited"] = f"{chosen} There is a {c} {s}."  # the answer and the evidence for it
    return record


def _garbled(rng: random.Random, heldout: bool) -> dict[str, Any]:
    if rng.random() < 0.5:
        a, b = _sum_question(rng, heldout)
        prompt, reply = f"Question: what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    else:
        scene, objects = _scene(rng)
        c, s = rng.choice(objects)
        prompt, reply = f"{scene} Question: What color is the {s}?", f"The {s} is {c}."
    words = reply.rstrip(".").split()
    shuffled = words[1:]  # the first word stays: the others then keep their in-vocabulary " word" tokens
    while shuffled == words[1:]:
        rng.shuffle(shuffled)
    return {"prompt": prompt, "chosen": reply, "rejected": " ".join(words[:1] + shuffled) + ".",
            "strength": "significantly_better", "kind": "garbled"}  # fmt: skip


def generate_preferences(
    n: int, seed: int = 0, heldout: bool = False, edited_fraction: float = 0.25
) -> list[dict[str, Any]]:
    """`n` preference records (jsonl dicts, with an extra `kind` field): arithmetic, scene and garbled
    in proportions 2:1:1. `heldout` draws the held-out arithmetic questions instead of the training ones."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        kind = rng.choice(("arithmetic", "arithmetic", "scene", "garbled"))
        if kind == "arithmetic":
            records.append(_arithmetic(rng, heldout, edited_fraction))
        elif kind == "scene":
            records.append(_scene_question(rng, edited_fraction))
        else:
            records.append(_garbled(rng, heldout))
    return records


def write_preference_splits(
    out_dir: str | Path, n_train: int = 2000, n_val: int = 400, seed: int = 0, edited_fraction: float = 0.25
) -> dict[str, Path]:
    """train.jsonl and val.jsonl (held-out questions, another seed) in `out_dir`; returns their paths."""
    out = Path(out_dir)
    train = generate_preferences(n_train, seed, heldout=False, edited_fraction=edited_fraction)
    val = generate_preferences(n_val, seed + 1_000_003, heldout=True, edited_fraction=edited_fraction)
    return {
        "train": write_preferences(out / "train.jsonl", train),
        "val": write_preferences(out / "val.jsonl", val),
    }


def preference_texts(records: list[dict[str, Any]]) -> list[str]:
    """Every string of `records` (to build a vocabulary subset that covers them)."""
    return [r[k] for r in records for k in ("prompt", "chosen", "rejected", "edited") if k in r]


__all__ = [
    "KINDS",
    "arithmetic_strength",
    "generate_preferences",
    "is_heldout_sum",
    "preference_texts",
    "write_preference_splits",
]
