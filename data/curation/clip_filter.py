"""CLIP-score filtering of image-text pairs (paper §7.1: "remove pairs with low CLIP scores").

The score is the cosine similarity of open_clip's image and text embeddings (not the ×100 logit
scale), in [-1, 1]; pairs with score < threshold are dropped. Any open_clip architecture works:
a built-in name (`ViT-B-32`, …) or a custom config (`--model-config my.json`, registered with
`open_clip.add_model_config`), with weights from a *local file* (`pretrained=PATH`). Tags such as
"openai" would download, so they are refused.

Outputs: kept.jsonl (records + `clip_score`), rejects.jsonl (records + `reason`, `clip_score`
where computed), report.json (counts per reason, score histogram, throughput).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.curation.image_sources import ImageSource, Sample
from herd.data.records import atomic_write, atomic_write_json, dumps

TEXT_FIELDS = ("caption", "text", "txt")


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("CLIP filtering needs open_clip: pip install 'herd[data]' open_clip_torch") from e
    return open_clip


def register_model_config(name: str, config: dict[str, Any]) -> None:
    """Make an architecture dict (embed_dim / vision_cfg / text_cfg) available under `name`."""
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    _open_clip().factory._MODEL_CONFIGS[name] = dict(config)


def load_clip(
    model_name: str,
    pretrained: str | Path | None,
    *,
    model_config: str | Path | None = None,
    random_init: bool = False,
    device: str = "cpu",
):
    """(model, preprocess, tokenizer) in eval mode. `pretrained` must be a local weights file;
    `random_init=True` (tests) builds the architecture with random weights instead."""
    open_clip = _open_clip()
    if model_config is not None:
        open_clip.add_model_config(Path(model_config))  # registered under the file's stem
    if pretrained is None and not random_init:
        raise ValueError(
            "give a local weights file (pretrained=PATH); random weights only with random_init=True"
        )
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"CLIP weights {pretrained} not found (weights are never downloaded)")
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(pretrained) if pretrained is not None else None, device=device
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return model.eval(), preprocess, tokenizer


@torch.inference_mode()
def clip_scores(model: Any, images: torch.Tensor, tokens: torch.Tensor, device: str = "cpu") -> np.ndarray:
    """cos(image_emb, text_emb) per pair: images (b, 3, H, W) preprocessed, tokens (b, L) → (b,)."""
    img = model.encode_image(images.to(device)).float()  # (b, e)
    txt = model.encode_text(tokens.to(device)).float()  # (b, e)
    img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (img * txt).sum(-1).cpu().numpy()


def caption_of(rec: dict[str, Any], text_field: str | None) -> str | None:
    fields: Sequence[str] = (text_field,) if text_field else TEXT_FIELDS
    for f in fields:
        v = rec.get(f)
        if isinstance(v, str) and v.strip():
            return v
    return None


def _samples(source: ImageSource) -> Iterator[Sample]:
    for shard in source.iter_shards(0, 1):
        yield from shard.samples()


def filter_clip(
    source: ImageSource,
    out_dir: str | Path,
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    threshold: float,
    *,
    text_field: str | None = None,
    batch_size: int = 64,
    decode_threads: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Score every pair, keep those with score ≥ threshold; returns (and writes) the report."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    all_scores: list[np.ndarray] = []
    t0 = time.perf_counter()

    def prep(s: Sample) -> torch.Tensor | str:
        try:
            return preprocess(s.load())
        except Exception as e:  # unreadable image: rejected with its reason, never a crash
            return f"{type(e).__name__}: {e}"

    def flush(batch: list[Sample], kept_f: Any, rej_f: Any) -> None:
        ims = list(pool.map(prep, batch))
        ok = []
        for s, im in zip(batch, ims):
            if isinstance(im, str):
                counts["unreadable_image"] += 1
                rej_f.write(dumps({**s.record, "reason": "unreadable_image", "error": im}) + "\n")
            else:
                ok.append((s, im))
        if not ok:
            return
        tokens = tokenizer([caption_of(s.record, text_field) for s, _ in ok])
        sc = clip_scores(model, torch.stack([im for _, im in ok]), tokens, device)
        all_scores.append(sc)
        for (s, _), v in zip(ok, sc):
            rec = {**s.record, "clip_score": round(float(v), 6)}
            if v >= threshold:
                counts["kept"] += 1
                kept_f.write(dumps(rec) + "\n")
            else:
                counts["clip_score_below_threshold"] += 1
                rej_f.write(dumps({**rec, "reason": "clip_score_below_threshold"}) + "\n")

    columns = (SpinnerColumn(), TextColumn("[bold]clip filter[/] {task.description}"), TimeElapsedColumn())
    with (
        ThreadPoolExecutor(max(1, decode_threads)) as pool,
        atomic_write(out / "kept.jsonl") as kept_f,
        atomic_write(out / "rejects.jsonl") as rej_f,
        Progress(*columns, disable=not progress) as bar,
    ):
        task = bar.add_task("", total=None)
        batch: list[Sample] = []
        seen = 0
        for s in _samples(source):
            seen += 1
            if caption_of(s.record, text_field) is None:
                counts["missing_text"] += 1
                rej_f.write(dumps({**s.record, "reason": "missing_text"}) + "\n")
                continue
            batch.append(s)
            if len(batch) == batch_size:
                flush(batch, kept_f, rej_f)
                batch = []
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, description=f"{seen} pairs, {counts['kept']} kept, {rate:.1f} pairs/s")
        if batch:
            flush(batch, kept_f, rej_f)
    seconds = time.perf_counter() - t0
    sc_all = np.concatenate(all_scores) if all_scores else np.zeros(0, np.float32)
    hist, edges = np.histogram(sc_all, bins=20, range=(-1.0, 1.0))
    report = {
        "source": source.describe(),
        "threshold": threshold,
        "pairs": seen,
        "kept": counts["kept"],
        "removed": dict((k, v) for k, v in counts.items() if k != "kept"),
        "bad_records": dict(source.bad),
        "score_histogram": {"edges": edges.round(3).tolist(), "counts": hist.tolist()},
        "score_mean": float(sc_all.mean()) if len(sc_all) else None,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(seen / seconds, 2) if seconds > 0 else None,
    }
    atomic_write_json(out / "report.json", report)
    return report
