"""`herd eval vqa | video-qa | asr`: a vision, video or speech checkpoint answers a jsonl set through
`herd.ask` (`VisionQA`, `VideoQA`, `SpeechQA`, the classes `herd ask` uses); scores per question type.

Records (media paths relative to the jsonl file, as the training manifests have them):
- vqa:      {"image", "question", "answers": [10 human answers] | "answer" (+ "response"), "question_type"?}
- video-qa: {"video", "question", "answers" | "answer" (+ "response"), "question_type"?}
- asr:      {"audio", "text" (the reference transcript), "question_type"?}

Scores (`herd.evaluation.answers`): VQA accuracy (10-annotator rule over leave-one-out subsets when a list of
answers is given; otherwise exact match after VQA normalisation against `answer` or `response`, the
herd synthetic sets' one-word answer and the full sentence trained on); video QA the same exact match;
ASR pooled WER and CER (jiwer). The baseline beside each type is the best *constant* answer's score on
that type (the "prior" baseline of the VQA paper) for QA, and the empty transcript (WER 1) for ASR.
Bad records (missing fields, missing or unreadable media) are skipped and counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter, numbered_json_lines
from herd.evaluation.answers import error_rates, exact_match, normalize_vqa_answer, vqa_accuracy

MEDIA = {"vqa": "image", "video-qa": "video", "asr": "audio"}


def read_records(kind: str, path: str | Path, skipped: SkipCounter) -> list[dict[str, Any]]:
    """Valid records of a `kind` set, each with `media` resolved and `references` (answers or transcript)."""
    if kind not in MEDIA:
        raise ValueError(f"unknown evaluation {kind!r}; choose one of {', '.join(MEDIA)}")
    path = Path(path)
    out = []
    for where, rec in numbered_json_lines(path, skipped):
        if not isinstance(rec, dict) or not isinstance(rec.get(MEDIA[kind]), str):
            skipped.add("missing_fields", where, f'needs "{MEDIA[kind]}" (a path)')
            continue
        if kind == "asr":
            refs = [rec["text"]] if isinstance(rec.get("text"), str) and rec["text"].strip() else []
        elif isinstance(rec.get("answers"), list):
            refs = [a.get("answer") if isinstance(a, dict) else a for a in rec["answers"]]  # VQA's dicts too
            refs = [a for a in refs if isinstance(a, str)]
        else:
            refs = [rec[k] for k in ("answer", "response") if isinstance(rec.get(k), str)]
        if not refs or (kind != "asr" and not isinstance(rec.get("question"), str)):
            skipped.add(
                "missing_fields",
                where,
                "needs a question and answers" if kind != "asr" else 'needs "text"',
            )
            continue
        media = path.parent / rec[MEDIA[kind]]
        if not media.is_file():
            skipped.add("missing_file", where, f"{media} does not exist")
            continue
        out.append({**rec, "media": media, "references": refs, "several": isinstance(rec.get("answers"), list),
                    "type": str(rec.get("question_type", "all"))})  # fmt: skip
    return out


def record_score(kind: str, record: dict[str, Any], prediction: str) -> float:
    if record["several"]:
        return vqa_accuracy(prediction, record["references"])
    return exact_match(prediction, record["references"])


def best_constant_score(kind: str, records: Sequence[dict[str, Any]]) -> float:
    """The best score one fixed answer reaches on `records` (tried: the 50 most common references)."""
    counts = Counter(normalize_vqa_answer(r) for rec in records for r in rec["references"])
    candidates = [a for a, _ in counts.most_common(50)]
    return max(sum(record_score(kind, rec, c) for rec in records) / len(records) for c in candidates)


def score_predictions(
    kind: str, records: Sequence[dict[str, Any]], predictions: Sequence[str]
) -> dict[str, Any]:
    """Per question type and overall: QA accuracy beside the best constant answer, or ASR WER/CER."""
    types = sorted({r["type"] for r in records})
    groups = {t: [i for i, r in enumerate(records) if r["type"] == t] for t in types}
    groups["overall"] = list(range(len(records)))
    report: dict[str, Any] = {"examples": len(records), "per_type": {}}
    for name, idx in groups.items():
        recs, preds = [records[i] for i in idx], [predictions[i] for i in idx]
        if kind == "asr":
            rates = error_rates([r["references"][0] for r in recs], preds)
            report["per_type"][name] = {"count": len(idx), **rates, "baseline_wer": 1.0}
        else:
            acc = sum(record_score(kind, r, p) for r, p in zip(recs, preds)) / len(recs)
            report["per_type"][name] = {
                "count": len(idx),
                "accuracy": acc,
                "baseline": best_constant_score(kind, recs),
            }
    return report


def _predict(kind: str, model_dir: str | Path, records: list[dict[str, Any]], skipped: SkipCounter, device: str,
             batch_size: int, max_new_tokens: int) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Answers through herd.ask, in batches; media that cannot be decoded are skipped and counted."""
    from herd.ask import SpeechQA, VideoQA, VisionQA, read_image

    if kind == "vqa":
        qa: Any = VisionQA.load(model_dir, device=device)
        read = read_image
    elif kind == "video-qa":
        qa = VideoQA.load(model_dir, device=device)
        read = qa.read
    else:
        qa = SpeechQA.load(model_dir, device=device)
        read = SpeechQA.read
    kept, inputs = [], []
    for rec in records:
        try:
            inputs.append(read(rec["media"]))
            kept.append(rec)
        except (OSError, ValueError) as e:  # VideoReadError / AudioError are ValueErrors naming the file
            skipped.add("unreadable_media", str(rec["media"]), str(e))
    predictions: list[str] = []
    for start in range(0, len(kept), batch_size):
        chunk, media = kept[start : start + batch_size], inputs[start : start + batch_size]
        if kind == "asr":
            predictions += qa.ask(media, [qa.transcribe_prompt()] * len(media), max_new_tokens)
        else:
            predictions += qa.ask(media, [r["question"] for r in chunk], max_new_tokens)
    return kept, predictions


def run_multimodal(
    kind: str,
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    batch_size: int = 8,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Writes `<kind>.json` (scores per type, skipped records), `<kind>_predictions.jsonl` and `<kind>.png`."""
    from herd.evaluation.plots import bar_chart

    skipped = SkipCounter()
    records = read_records(kind, data, skipped)
    if not records:
        raise ValueError(f"{data}: no valid {kind} record ({skipped.total} skipped)")
    kept, predictions = _predict(kind, model_dir, records, skipped, device, batch_size, max_new_tokens)
    if not kept:
        raise ValueError(f"{data}: no record could be read ({dict(skipped.counts)})")
    report = score_predictions(kind, kept, predictions)
    report["skipped"] = dict(skipped.counts)
    report["skipped_examples"] = skipped.examples
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = kind.replace("-", "_")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    with open(out / f"{name}_predictions.jsonl", "w") as f:
        for rec, pred in zip(kept, predictions):
            f.write(json.dumps({MEDIA[kind]: rec[MEDIA[kind]], "type": rec["type"], "prediction": pred,
                                "references": rec["references"]}) + "\n")  # fmt: skip
    per = report["per_type"]
    if kind == "asr":
        bar_chart({t: v["wer"] for t, v in per.items()}, out / f"{name}.png", "word error rate per type", "WER",
                  reference={t: v["baseline_wer"] for t, v in per.items()}, reference_label="empty transcript")  # fmt: skip
    else:
        bar_chart({t: v["accuracy"] for t, v in per.items()}, out / f"{name}.png", f"{kind} accuracy per question type",
                  "accuracy", reference={t: v["baseline"] for t, v in per.items()},
                  reference_label="best constant answer")  # fmt: skip
    return report


__all__ = [
    "MEDIA",
    "best_constant_score",
    "read_records",
    "record_score",
    "run_multimodal",
    "score_predictions",
]
