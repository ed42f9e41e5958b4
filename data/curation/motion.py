"""Motion-score video filter (paper §7.1: videos with little motion are removed, after Girdhar et al.,
"Emu Video", 2023).

Motion score of a video: sample N frames uniformly over the whole video (`herd.vision.video.read_frames`,
the sampling the model sees), convert each to grayscale in [0, 1] (ITU-R BT.601 luma / 255), and take the
mean absolute difference between consecutive *distinct* sampled frames, averaged over pixels and pairs:

    score = mean_{i, y, x} |Y_{i+1}(y, x) − Y_i(y, x)|   ∈ [0, 1]

It is a mean absolute frame difference, not an optical-flow magnitude: no flow model to ship, cheap on
CPU, and what it must separate (static slideshows and still shots from real motion) it separates. A static
video scores ≈ 0 (only codec noise: < 0.005 on the generated test clips); a frame repeated because the
video is shorter than N (mask False) is left out, so a short clip is not made to look static. A video
with a single distinct frame scores exactly 0. The score also rises with cuts and fades, which the paper's
filter accepts the same way.

`filter_videos` scores a manifest's videos (or a list of files), keeps those with score ≥ threshold and
writes to the output folder:
  * kept.jsonl / removed.jsonl: the input records plus `motion_score` (removed ones with `reason`:
    `low_motion`, or the reader's error reason and message for a file that cannot be read);
  * report.json: counts, bad files by reason, the score distribution (quantiles, histogram);
  * motion_hist.png: that histogram, drawn with PIL (matplotlib is not a dependency), threshold marked.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.records import SkipCounter, atomic_write, atomic_write_json, dumps, iter_jsonl
from herd.vision.video import VIDEO_EXTS, Backend, VideoFrames, VideoReadError, read_frames

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
HIST_PNG = "motion_hist.png"


def motion_score(video: VideoFrames) -> float:
    """Mean absolute difference of consecutive distinct sampled frames, grayscale in [0, 1]."""
    frames = video.frames[video.mask]  # (M, H, W, 3) uint8, repeats of short videos left out
    if frames.shape[0] < 2:
        return 0.0
    gray = (frames.float() @ torch.tensor(LUMA)) / 255.0  # (M, H, W)
    return float((gray[1:] - gray[:-1]).abs().mean())


def video_motion(path: str | Path, num_frames: int = 16, backend: Backend = "auto") -> float:
    """`motion_score` of the file at `path`; raises `VideoReadError` (naming the file) when unreadable."""
    return motion_score(read_frames(path, num_frames, backend))


def _manifest_records(manifest: Path, skipped: SkipCounter) -> Iterator[tuple[dict[str, Any], Path]]:
    """(record, video path) per usable line; paths are relative to the manifest's folder."""
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: video manifest not found")
    for item in iter_jsonl(manifest):
        if item.record is None:
            skipped.add(item.bad or "bad_record", item.where)
        elif not isinstance(video := item.record.get("video"), str) or not video:
            skipped.add("no_video_field", item.where)
        else:
            yield item.record, manifest.parent / video


def video_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, plus every file with a video extension under the given folders, sorted."""
    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTS)
        else:
            out.append(p)  # a missing or non-video file is scored, fails, and is counted
    return out


def filter_videos(
    out_dir: str | Path,
    threshold: float,
    manifest: str | Path | None = None,
    videos: Iterable[str | Path] | None = None,
    num_frames: int = 16,
    backend: Backend = "auto",
    bins: int = 20,
) -> dict[str, Any]:
    """Score every video, keep those with motion_score ≥ threshold; writes the outputs, returns the report."""
    if (manifest is None) == (videos is None):
        raise ValueError("give a manifest or video files, not both and not neither")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a motion score in [0, 1], got {threshold}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped, bad, counts = SkipCounter(), SkipCounter(), Counter()
    if manifest is not None:
        items: Iterable[tuple[dict[str, Any], Path]] = _manifest_records(Path(manifest), skipped)
    else:
        items = (({"video": str(f)}, f) for f in video_files(videos or []))
    scores: list[float] = []
    t0 = time.perf_counter()
    with atomic_write(out / "kept.jsonl") as kept_f, atomic_write(out / "removed.jsonl") as removed_f:
        for record, path in items:
            counts["videos"] += 1
            try:
                score = video_motion(path, num_frames, backend)
            except VideoReadError as e:  # a bad file is removed and counted by reason, never a crash
                bad.add(e.reason, e.path, str(e))
                removed_f.write(dumps({**record, "reason": e.reason, "error": str(e)}) + "\n")
                continue
            scores.append(score)
            row = {**record, "motion_score": round(score, 6)}
            if score >= threshold:
                counts["kept"] += 1
                kept_f.write(dumps(row) + "\n")
            else:
                counts["low_motion"] += 1
                removed_f.write(dumps({**row, "reason": "low_motion"}) + "\n")
    seconds = time.perf_counter() - t0
    report = _report(np.asarray(scores, dtype=np.float64), threshold, bins)
    report.update(
        videos=counts["videos"],
        kept=counts["kept"],
        removed={"low_motion": counts["low_motion"], **dict(sorted(bad.counts.items()))},
        bad_files=dict(sorted(bad.counts.items())),
        bad_examples=bad.examples,
        bad_records=dict(sorted(skipped.counts.items())),  # manifest lines that name no video
        num_frames=num_frames,
        seconds=round(seconds, 3),
        videos_per_s=round(counts["videos"] / seconds, 2) if seconds > 0 else None,
        histogram_png=str(out / HIST_PNG),
    )
    draw_histogram(report, out / HIST_PNG)
    atomic_write_json(out / "report.json", report)
    return report


def _report(scores: np.ndarray, threshold: float, bins: int) -> dict[str, Any]:
    """Score distribution: quantiles and a histogram over [0, top] (top: the largest score or the
    threshold, padded, so a corpus of small scores is not squeezed into one bar of [0, 1])."""
    top = float(max(scores.max(initial=0.0), threshold) * 1.05) or 1e-3
    hist, edges = np.histogram(scores, bins=bins, range=(0.0, min(top, 1.0)))
    quantiles = {}
    if len(scores):
        qs = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0])
        quantiles = dict(zip(("min", "p10", "median", "p90", "max"), np.round(qs, 6).tolist()))
        quantiles["mean"] = round(float(scores.mean()), 6)
    return {
        "threshold": threshold,
        "score": quantiles,
        "histogram": {"edges": np.round(edges, 6).tolist(), "counts": hist.tolist()},
    }


def draw_histogram(report: dict[str, Any], path: str | Path, size: tuple[int, int] = (640, 360)) -> Path:
    """The report's histogram as a PNG: bars below the threshold red, at or above it green, the
    threshold a vertical line; axis labels from PIL's built-in font."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 50, 20, 30, 40  # margins for the labels
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    edges, counts = report["histogram"]["edges"], report["histogram"]["counts"]
    lo, hi, peak = edges[0], edges[-1], max(max(counts), 1)
    x_of = lambda v: left + (v - lo) / (hi - lo) * (W - left - right)
    y_of = lambda c: H - bottom - c / peak * (H - top - bottom)
    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        colour = (60, 160, 80) if a >= report["threshold"] else (200, 70, 60)
        draw.rectangle([x_of(a) + 1, y_of(c), x_of(b) - 1, H - bottom], fill=colour)
    draw.line([left, H - bottom, W - right, H - bottom], fill="black")
    draw.line([left, top, left, H - bottom], fill="black")
    tx = x_of(min(report["threshold"], hi))
    draw.line([tx, top, tx, H - bottom], fill=(40, 40, 200), width=2)
    draw.text((left, H - bottom + 6), f"{lo:.3g}", fill="black", font=font)
    draw.text((W - right - 40, H - bottom + 6), f"{hi:.3g}", fill="black", font=font)
    draw.text((tx + 4, top), f"threshold {report['threshold']:.3g}", fill=(40, 40, 200), font=font)
    draw.text((4, top), str(peak), fill="black", font=font)
    draw.text((left, 8), f"motion score: {sum(counts)} videos", fill="black", font=font)
    draw.text((W // 2 - 60, H - 16), "mean |frame difference|", fill="black", font=font)
    img.save(path)
    return Path(path)


def read_scores(path: str | Path) -> dict[str, float]:
    """{video path: motion_score} from a kept.jsonl or removed.jsonl (bad files have none)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if "motion_score" in rec:
            out[rec["video"]] = rec["motion_score"]
    return out


__all__ = ["draw_histogram", "filter_videos", "motion_score", "read_scores", "video_files", "video_motion"]
