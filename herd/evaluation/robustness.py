"""The Llama 3 paper's robustness analysis of multiple-choice evaluation (§5.1): the same questions asked
with the answers in another order, under other label sets, and after few-shot examples whose correct
labels are distributed differently; the spread of accuracy across variants measures the sensitivity.

Records (jsonl): {"question": str, "choices": [str, ...], "answer": int index}. Bad records are skipped
and counted by reason. Prompt of one question (labels from the variant's label set):

    {question}
    A. {choice 0}
    B. {choice 1}
    Answer:

scored against each " {label}" (log-likelihood, BOS first); the prediction is the best label. Few-shot
examples (other records of the file, fixed by the seed) come before it, each followed by " {label}" and
a blank line.

Variants (each a list of (prompt, labels, correct index) per record):
- `labels:<name>` — the original order under each of `LABEL_SETS` (A/B/C/D, 1/2/3/4, $ & # @, a/b/c/d);
- `order:<p>` — choices rotated so that the correct one is at position p (p = 0 … k-1), letters;
- `fewshot:<dist>` — `shots` examples whose correct labels are all the first label (`all_first`), all
  the last (`all_last`) or spread evenly (`balanced`), letters, original order.

A label set whose labels the tokenizer cannot tell apart (a trimmed vocabulary maps unseen symbols to
one unknown id) is left out and named in the report; the order and few-shot variants then use the
first label set left (numbers for the quickstart's vocabulary).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter, numbered_json_lines

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "letters": ("A", "B", "C", "D", "E", "F", "G", "H"),
    "numbers": ("1", "2", "3", "4", "5", "6", "7", "8"),
    "symbols": ("$", "&", "#", "@", "%", "*", "^", "~"),
    "lowercase": ("a", "b", "c", "d", "e", "f", "g", "h"),
}
MAX_CHOICES = 8
# (prompt, continuation) pairs → their log-likelihoods: `herd.evaluation.scoring.score_texts` in use.
Scorer = Callable[[list[tuple[str, str]]], list[float]]


@dataclass(frozen=True)
class MCRecord:
    question: str
    choices: tuple[str, ...]
    answer: int


def read_mc_records(path: str | Path, skipped: SkipCounter | None = None) -> list[MCRecord]:
    """The valid records of a multiple-choice jsonl file; the others counted in `skipped` by reason."""
    skipped = skipped if skipped is not None else SkipCounter()
    out = []
    for where, rec in numbered_json_lines(path, skipped):
        if not isinstance(rec, dict):
            skipped.add("not_an_object", where)
            continue
        q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
        if (
            not isinstance(q, str)
            or not isinstance(choices, list)
            or not all(isinstance(c, str) for c in choices)
        ):
            skipped.add("missing_fields", where, "needs question (str) and choices (list of str)")
        elif not 2 <= len(choices) <= MAX_CHOICES:
            skipped.add("choice_count", where, f"{len(choices)} choices (2-{MAX_CHOICES} supported)")
        elif not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            skipped.add("bad_answer", where, f"answer {answer!r} is not an index into choices")
        else:
            out.append(MCRecord(q, tuple(choices), answer))
    return out


def render(rec: MCRecord, labels: Sequence[str]) -> str:
    lines = [rec.question] + [f"{labels[i]}. {c}" for i, c in enumerate(rec.choices)]
    return "\n".join(lines) + "\nAnswer:"


def rotate_to(rec: MCRecord, position: int) -> MCRecord:
    """The record with its choices rotated so that the correct one sits at `position`."""
    k = len(rec.choices)
    shift = (position - rec.answer) % k
    choices = tuple(rec.choices[(i - shift) % k] for i in range(k))
    return MCRecord(rec.question, choices, position)


def fewshot_prefix(examples: Sequence[MCRecord], labels: Sequence[str]) -> str:
    return "".join(f"{render(r, labels)} {labels[r.answer]}\n\n" for r in examples)


def _shots(records: Sequence[MCRecord], i: int, shots: int, dist: str, rng: random.Random) -> list[MCRecord]:
    """`shots` other records, each rotated so its correct label follows the distribution `dist`."""
    pool = [r for j, r in enumerate(records) if j != i]
    picked = rng.sample(pool, min(shots, len(pool)))
    out = []
    for s, r in enumerate(picked):
        k = len(r.choices)
        position = {"all_first": 0, "all_last": k - 1, "balanced": s % k}[dist]
        out.append(rotate_to(r, position))
    return out


def build_variants(
    records: Sequence[MCRecord],
    shots: int = 4,
    seed: int = 0,
    label_sets: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, list[tuple[str, tuple[str, ...], int]]]:
    """variant name → per record (prompt, labels, correct index); see the module docstring."""
    variants: dict[str, list[tuple[str, tuple[str, ...], int]]] = {}
    label_sets = LABEL_SETS if label_sets is None else label_sets
    if not label_sets:
        raise ValueError("no label set the tokenizer can tell apart")
    for name, labels in label_sets.items():
        variants[f"labels:{name}"] = [
            (render(r, labels), labels[: len(r.choices)], r.answer) for r in records
        ]
    # order and few-shot variants: letters, or the first label set the tokenizer keeps apart
    letters = label_sets.get("letters") or next(iter(label_sets.values()))
    for p in range(min(len(r.choices) for r in records) if records else 0):
        rotated = [rotate_to(r, p) for r in records]
        variants[f"order:{p}"] = [(render(r, letters), letters[: len(r.choices)], p) for r in rotated]
    if shots > 0 and len(records) > 1:
        for dist in ("all_first", "balanced", "all_last"):
            rng = random.Random(seed)  # the same examples for every distribution: only the labels move
            variants[f"fewshot:{dist}"] = [
                (fewshot_prefix(_shots(records, i, shots, dist, rng), letters) + render(r, letters),
                 letters[: len(r.choices)], r.answer)
                for i, r in enumerate(records)
            ]  # fmt: skip
    return variants


def variant_accuracy(
    items: Sequence[tuple[str, tuple[str, ...], int]], scorer: Scorer
) -> tuple[float, list[int]]:
    """Accuracy of one variant and the predicted index of every item (ties → the first label)."""
    pairs = [(prompt, f" {label}") for prompt, labels, _ in items for label in labels]
    scores = scorer(pairs)
    predictions, at = [], 0
    for _, labels, _ in items:
        row = scores[at : at + len(labels)]
        predictions.append(max(range(len(labels)), key=lambda j: (row[j], -j)))
        at += len(labels)
    correct = sum(p == item[2] for p, item in zip(predictions, items))
    return correct / len(items) if items else 0.0, predictions


def spread(values: Sequence[float]) -> dict[str, float]:
    import statistics

    return {
        "min": min(values),
        "max": max(values),
        "range": max(values) - min(values),
        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
    }


def distinct_label_sets(tokenizer: Any) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """The label sets whose " label" continuations the tokenizer keeps apart, and the names of the others
    (a trimmed vocabulary maps unseen symbols to one unknown id: every choice would tie)."""
    keep, dropped = {}, []
    for name, labels in LABEL_SETS.items():
        encoded = {tuple(tokenizer.encode(f" {label}", bos=False, eos=False)) for label in labels}
        unk = getattr(tokenizer, "unk_id", None)
        if len(encoded) == len(labels) and not any(unk in e for e in encoded):
            keep[name] = labels
        else:
            dropped.append(name)
    return keep, dropped


def robustness_report(
    records: Sequence[MCRecord], scorer: Scorer, shots: int = 4, seed: int = 0,
    label_sets: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy per variant and the spread within each family (labels, order, fewshot) and overall."""
    accuracy = {}
    for name, items in build_variants(records, shots, seed, label_sets).items():
        accuracy[name], _ = variant_accuracy(items, scorer)
    families: dict[str, list[float]] = {}
    for name, acc in accuracy.items():
        families.setdefault(name.split(":")[0], []).append(acc)
    report = {"examples": len(records), "accuracy": accuracy}
    report["spread"] = {family: spread(v) for family, v in families.items()}
    report["spread"]["all"] = spread(list(accuracy.values()))
    report["chance"] = sum(1 / len(r.choices) for r in records) / len(records) if records else 0.0
    return report


def model_scorer(model: Any, tokenizer: Any, batch_size: int = 8) -> Scorer:
    from herd.evaluation.scoring import score_texts

    return lambda pairs: [s.logprob for s in score_texts(model, tokenizer, pairs, batch_size)]


def run_robustness(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    shots: int = 4,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """`herd eval robustness`: `robustness_report` of a checkpoint on a multiple-choice jsonl file; writes
    `robustness.json` and `robustness.png` (accuracy per variant beside chance) into `out_dir`."""
    from herd.evaluation.plots import bar_chart
    from herd.text.loading import load_pretrained

    skipped = SkipCounter()
    records = read_mc_records(data, skipped)
    if not records:
        raise ValueError(f"{data}: no valid multiple-choice record ({skipped.total} skipped)")
    model, tokenizer = load_pretrained(model_dir, device=device)
    label_sets, dropped = distinct_label_sets(tokenizer)
    report = robustness_report(records, model_scorer(model, tokenizer, batch_size), shots, seed, label_sets)
    report["label_sets_dropped"] = dropped  # not representable by this tokenizer
    report["skipped"] = dict(skipped.counts)
    report["skipped_examples"] = skipped.examples
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=2))
    chance = {name: report["chance"] for name in report["accuracy"]}
    bar_chart(report["accuracy"], out / "robustness.png", "multiple-choice accuracy per variant", "accuracy",
              reference=chance)  # fmt: skip
    return report


__all__ = [
    "LABEL_SETS",
    "MCRecord",
    "build_variants",
    "distinct_label_sets",
    "model_scorer",
    "read_mc_records",
    "robustness_report",
    "rotate_to",
    "run_robustness",
    "spread",
    "variant_accuracy",
]
