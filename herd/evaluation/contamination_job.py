"""`herd eval contamination`: evaluation tasks (jsonl) against a training corpus (token shards or jsonl),
by `herd.evaluation.contamination`'s 8-gram overlap; per task the contaminated fraction and, where scores
exist, the score on the clean and on the contaminated subset.

Task records (one jsonl file per task, named by its stem): {"text": str, "correct"?: 0/1} — the text whose
overlap is measured and, optionally, whether the model got it right; or multiple-choice records
{"question", "choices", "answer"}, whose text is the question followed by the correct choice and which,
given `model`, are scored by log-likelihood (the best choice after the question). Bad records are skipped
and counted by reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.progress import Progress

from herd.data.records import SkipCounter, numbered_json_lines
from herd.evaluation.contamination import NGRAM, NgramIndex, clean_vs_contaminated, jsonl_blocks, shard_blocks
from herd.evaluation.robustness import MCRecord


def read_task_examples(
    path: str | Path, skipped: SkipCounter
) -> list[tuple[str, float | None, MCRecord | None]]:
    """(text, given score or None, the multiple-choice record or None) of each valid record."""
    out: list[tuple[str, float | None, MCRecord | None]] = []
    for where, rec in numbered_json_lines(path, skipped):
        if not isinstance(rec, dict):
            skipped.add("not_an_object", where)
        elif isinstance(rec.get("text"), str):
            correct = rec.get("correct")
            score = float(correct) if isinstance(correct, (bool, int, float)) else None
            out.append((rec["text"], score, None))
        elif (
            isinstance(rec.get("question"), str)
            and isinstance(rec.get("choices"), list)
            and all(isinstance(c, str) for c in rec["choices"])
            and isinstance(rec.get("answer"), int)
            and 0 <= rec["answer"] < len(rec["choices"])
        ):
            mc = MCRecord(rec["question"], tuple(rec["choices"]), rec["answer"])
            out.append((f"{mc.question} {mc.choices[mc.answer]}", None, mc))
        else:
            skipped.add("missing_fields", where, 'needs "text", or "question"/"choices"/"answer"')
    return out


def _corpus_blocks(entries: Sequence[str | Path], tokenizer: Any, text_field: str, skipped: SkipCounter):
    """Blocks of every corpus entry: a token-shard folder (checked against `tokenizer`) or jsonl files."""
    from herd.data.training.token_shards import ShardedTokenStream

    jsonl = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir() and (path / "manifest.json").is_file():
            ShardedTokenStream(path).check_tokenizer(tokenizer)  # ids of another tokenizer never match
            yield from shard_blocks(path)
        else:
            jsonl.append(path)
    if jsonl:
        yield from jsonl_blocks(jsonl, tokenizer, text_field, skipped)


def _mc_correct(model: Any, tokenizer: Any, records: Sequence[MCRecord], batch_size: int) -> list[float]:
    from herd.evaluation.scoring import score_texts

    pairs = [(r.question, f" {c}") for r in records for c in r.choices]
    scores = [s.logprob for s in score_texts(model, tokenizer, pairs, batch_size)]
    out, at = [], 0
    for r in records:
        row = scores[at : at + len(r.choices)]
        out.append(float(max(range(len(row)), key=lambda j: (row[j], -j)) == r.answer))
        at += len(r.choices)
    return out


def run_contamination(
    tasks: Sequence[str | Path],
    corpus: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    model: str | Path | None = None,
    threshold: float = 0.5,
    text_field: str = "text",
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes `contamination.json` (per task: counts, contaminated fraction, mean overlap, clean vs
    contaminated scores, skipped records; per example: covered fraction) and `contamination.png`."""
    from herd.evaluation.plots import bar_chart
    from herd.text.loading import load_pretrained
    from herd.text.tokenizer import load_tokenizer

    skipped = SkipCounter()
    examples = {Path(t).stem: read_task_examples(t, skipped) for t in tasks}
    lm = None
    if model is not None:
        lm = load_pretrained(model)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        # a trimmed vocabulary (the quickstart's) maps unseen tokens to one unknown id, which would make
        # n-grams match that differ in the text: its full base tokenizer splits the text the same way
        tok = getattr(lm[1], "base", lm[1]) if lm else load_tokenizer(None)
    names = list(examples)
    token_lists = [tok.encode(text, bos=False, eos=False) for n in names for text, _, _ in examples[n]]
    index = NgramIndex.build(token_lists)
    corpus_skipped = SkipCounter()
    with Progress(disable=not progress) as bar:
        job = bar.add_task("scanning the corpus for 8-grams", total=None)
        for block in _corpus_blocks(corpus, tok, text_field, corpus_skipped):
            index.scan(block)
            index.corpus_tokens += len(block)
            bar.advance(job, len(block))
    overlaps = index.overlaps(threshold)
    report: dict[str, Any] = {"ngram": NGRAM, "threshold": threshold, "corpus_tokens_scanned": index.corpus_tokens,
                              "tasks": {}, "skipped": dict(skipped.counts),
                              "corpus_skipped": dict(corpus_skipped.counts)}  # fmt: skip
    at = 0
    for name in names:
        rows = examples[name]
        task_overlaps = overlaps[at : at + len(rows)]
        at += len(rows)
        scores: list[float] | None = None
        mc = [r for _, _, r in rows if r is not None]
        if lm is not None and len(mc) == len(rows) and rows:
            scores = _mc_correct(lm[0], lm[1], mc, batch_size)
        elif rows and all(s is not None for _, s, _ in rows):
            scores = [s for _, s, _ in rows]  # type: ignore[misc]
        summary = clean_vs_contaminated(task_overlaps, scores)
        summary["overlap"] = [round(o.fraction, 4) for o in task_overlaps]
        report["tasks"][name] = summary
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contamination.json").write_text(json.dumps(report, indent=2))
    fractions = {n: report["tasks"][n]["contaminated_fraction"] for n in names}
    bar_chart(fractions, out / "contamination.png", f"examples with >= {threshold:.0%} of tokens in corpus 8-grams",
              "contaminated fraction")  # fmt: skip
    return {k: v for k, v in report.items() if k != "tasks"} | {
        "tasks": {n: {k: v for k, v in s.items() if k != "overlap"} for n, s in report["tasks"].items()}
    }


__all__ = ["read_task_examples", "run_contamination"]
