"""Image dedup (paper §7.1): SSCD descriptors → near-duplicate pairs → groups → one pair kept per group.

Keep rule (documented in docs/data.md): inside a duplicate group the record with the highest numeric
`clip_score` is kept (records without one rank below any that has it); ties, and groups where no
record has a score, keep the member that comes first in input order. Records in no group are kept.

Outputs in the out folder:
    keep.jsonl     kept records in input order (all their fields)
    groups.jsonl   one line per duplicate group: size, kept record, members (id, image, row)
    report.json    counts, timings, similarity histogram of the pairs found, search statistics
    contact_sheet.png  thumbnails of the largest groups (kept one framed green)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from herd.data.curation.embed import (
    EmbedConfig,
    embed_source,
    load_embeddings,
    shard_files,
    wait_for_ranks,
)
from herd.data.curation.image_sources import ImageSource, open_image_ref
from herd.data.curation.near_dup_search import Pairs, SearchConfig, connected_groups, find_pairs
from herd.data.records import atomic_write, atomic_write_json, dumps, read_jsonl


def _score(rec: dict[str, Any]) -> float:
    v = rec.get("clip_score")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else -np.inf


def choose_keep(members: Sequence[int], records: Sequence[dict[str, Any]]) -> int:
    """Row to keep among `members` (ascending input order): best clip_score, else the first."""
    best, best_score = int(members[0]), _score(records[members[0]])
    for m in members[1:]:
        s = _score(records[m])
        if s > best_score:  # strict: ties keep the earlier record
            best, best_score = int(m), s
    return best


def group_members(labels: np.ndarray) -> list[np.ndarray]:
    """Components with ≥2 rows, each as ascending row ids; largest first (ties: earliest first)."""
    counts = np.bincount(labels)
    in_dup = counts[labels] > 1
    rows = np.nonzero(in_dup)[0]
    order = np.argsort(labels[rows], kind="stable")  # rows stay ascending inside each label
    rows = rows[order]
    splits = np.nonzero(np.diff(labels[rows]))[0] + 1
    groups = np.split(rows, splits) if len(rows) else []
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def similarity_histogram(sims: np.ndarray, threshold: float, bins: int = 20) -> dict[str, list]:
    edges = np.linspace(threshold, 1.0, bins + 1)
    counts, _ = np.histogram(np.clip(sims, threshold, 1.0), bins=edges)
    return {"edges": [round(float(e), 6) for e in edges], "counts": counts.tolist()}


def contact_sheet(
    groups: list[np.ndarray],
    keep: dict[int, int],
    records: Sequence[dict[str, Any]],
    path: str | Path,
    max_groups: int = 8,
    max_per_group: int = 8,
    thumb: int = 96,
) -> None:
    """PNG grid: one row per largest group, kept image framed green, removed ones red."""
    shown = groups[:max_groups]
    label_w, pad = 110, 4
    w = label_w + max_per_group * (thumb + pad) + pad
    h = max(1, len(shown)) * (thumb + pad) + pad
    sheet = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, g in enumerate(shown):
        y = pad + r * (thumb + pad)
        draw.text((pad, y + thumb // 2 - 6), f"group {r}: {len(g)}", fill=(0, 0, 0))
        for c, row in enumerate(g[:max_per_group]):
            x = label_w + pad + c * (thumb + pad)
            try:
                im = open_image_ref(str(records[row]["image"]))
                im.thumbnail((thumb - 6, thumb - 6))
            except Exception:  # missing file, or descriptors brought without images
                im = Image.new("RGB", (thumb - 6, thumb - 6), (200, 200, 200))
            colour = (0, 170, 0) if keep[r] == row else (210, 0, 0)
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=colour, width=3)
            sheet.paste(im, (x + 3 + (thumb - 6 - im.width) // 2, y + 3 + (thumb - 6 - im.height) // 2))
    with atomic_write(path, "wb") as f:
        sheet.save(f, format="PNG")


def dedup_embeddings(
    x: np.ndarray,
    records: Sequence[dict[str, Any]],
    cfg: SearchConfig,
    out_dir: str | Path,
    contact_groups: int = 8,
    extra_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Group rows of `x` (n, d) unit-norm by near-duplicate search and write keep/groups/report."""
    if len(x) != len(records):
        raise ValueError(f"{len(x)} descriptors for {len(records)} records")
    t0 = time.perf_counter()
    pairs: Pairs = find_pairs(x, cfg)
    return write_dedup_outputs(pairs, records, cfg, out_dir, contact_groups, extra_report, t0)


def write_dedup_outputs(
    pairs: Pairs,
    records: Sequence[dict[str, Any]],
    cfg: SearchConfig,
    out_dir: str | Path,
    contact_groups: int = 8,
    extra_report: dict[str, Any] | None = None,
    t0: float | None = None,
) -> dict[str, Any]:
    """Groups from `pairs` (rows of `records`), keep rule, keep/groups/report/contact sheet."""
    t0 = time.perf_counter() if t0 is None else t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = connected_groups(len(records), pairs)
    groups = group_members(labels)
    keep_of_group = {g: choose_keep(list(m), records) for g, m in enumerate(groups)}
    removed = np.zeros(len(records), bool)
    for g, m in enumerate(groups):
        removed[m] = True
        removed[keep_of_group[g]] = False
    with atomic_write(out / "keep.jsonl") as f:
        for i, rec in enumerate(records):
            if not removed[i]:
                f.write(dumps(rec) + "\n")
    with atomic_write(out / "groups.jsonl") as f:
        for g, m in enumerate(groups):
            k = keep_of_group[g]
            members = [
                {"row": int(i), "id": records[i].get("id"), "image": records[i].get("image")} for i in m
            ]
            line = {
                "group": g,
                "size": len(m),
                "kept": records[k].get("id"),
                "kept_row": k,
                "members": members,
            }
            f.write(dumps(line) + "\n")
    sheet = out / "contact_sheet.png"
    contact_sheet(groups, keep_of_group, records, sheet, max_groups=contact_groups)
    report = {
        **(extra_report or {}),
        "records": len(records),
        "pairs": len(pairs),
        "groups": len(groups),
        "records_in_groups": int(sum(len(m) for m in groups)),
        "removed": int(removed.sum()),
        "kept": int(len(records) - removed.sum()),
        "largest_groups": [len(m) for m in groups[:10]],
        "threshold": cfg.threshold,
        "keep_rule": "highest clip_score if present, else first in input order",
        "similarity_histogram": similarity_histogram(pairs.sim, cfg.threshold),
        "search": pairs.stats,
        "dedup_s": time.perf_counter() - t0,
        "contact_sheet": str(sheet),
    }
    atomic_write_json(out / "report.json", report)
    return report


def normalise_rows(x: np.ndarray, block: int = 65536) -> np.ndarray:
    """float32 copy of `x` with unit-norm rows, in blocks so a memory-mapped input is read once."""
    out = np.empty(x.shape, np.float32)
    for r0 in range(0, len(x), block):
        b = np.asarray(x[r0 : r0 + block], dtype=np.float32)
        out[r0 : r0 + block] = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return out


def dedup_images(
    source: ImageSource,
    out_dir: str | Path,
    search: SearchConfig,
    *,
    embeddings: str | Path | None = None,
    model: Any = None,
    embed_cfg: EmbedConfig | None = None,
    work_dir: str | Path | None = None,
    rank: int = 0,
    world: int = 1,
    wait_timeout_s: float = 86400.0,
    contact_groups: int = 8,
    sharded: bool = False,
    shard_rows: int = 65536,
) -> dict[str, Any] | None:
    """Full pipeline. With `embeddings` (an .npy whose rows follow the input order) no model runs;
    otherwise `model` embeds this rank's work shards into `work_dir`. Ranks > 0 return None.

    sharded=False: ranks > 0 stop after embedding; rank 0 waits for all ranks, loads every descriptor
    and searches alone (`near_dup_search.find_pairs`). sharded=True: every stage runs on every rank
    (`sharded_dup_search`, method "clusters"; float16 shards of `shard_rows` rows when descriptors
    are brought) and only rank 0 writes the outputs."""
    out = Path(out_dir)
    extra: dict[str, Any] = {"source": source.describe()}
    if sharded:
        return _dedup_sharded(
            source, out, search, embeddings, model, embed_cfg, work_dir, rank, world, wait_timeout_s,
            contact_groups, shard_rows, extra,
        )  # fmt: skip
    if embeddings is not None:
        records = _records_for(source, embeddings)
        x = normalise_rows(np.load(embeddings, mmap_mode="r"))
        extra["embeddings"] = str(embeddings)
    else:
        wd = _embed(source, out, model, embed_cfg, work_dir, rank, world, extra)
        if rank != 0:
            return None
        n_shards = wait_for_ranks(wd, world, timeout_s=wait_timeout_s, poll_s=1.0 if world == 1 else 5.0)
        x, records, n_bad = load_embeddings(wd, n_shards)
        extra["bad_images"] = n_bad
    extra["bad_records"] = dict(source.bad)
    return dedup_embeddings(x, records, search, out, contact_groups=contact_groups, extra_report=extra)


def _records_for(source: ImageSource, embeddings: str | Path) -> list[dict[str, Any]]:
    records = list(source.iter_records())
    raw = np.load(embeddings, mmap_mode="r")
    if raw.ndim != 2 or len(raw) != len(records):
        raise ValueError(
            f"{embeddings}: shape {raw.shape} but the input has {len(records)} valid records "
            "(rows must follow the input order, one per valid record)"
        )
    return records


def _embed(
    source: ImageSource, out: Path, model: Any, embed_cfg: EmbedConfig | None, work_dir: str | Path | None,
    rank: int, world: int, extra: dict[str, Any],
) -> Path:  # fmt: skip
    if model is None:
        raise ValueError("need a descriptor model (or --embeddings)")
    wd = Path(work_dir) if work_dir is not None else out / "embeddings"
    stats = embed_source(source, model, wd, embed_cfg, rank, world)
    extra["embed"] = {
        "computed_shards": stats.computed_shards, "skipped_shards": stats.skipped_shards,
        "images": stats.images, "bad_images": stats.bad_images, "seconds": round(stats.seconds, 3),
        "images_per_s": round(stats.images_per_s, 2), "rank": rank, "world": world,
    }  # fmt: skip
    return wd


def _dedup_sharded(
    source: ImageSource, out: Path, search: SearchConfig, embeddings: str | Path | None, model: Any,
    embed_cfg: EmbedConfig | None, work_dir: str | Path | None, rank: int, world: int,
    wait_timeout_s: float, contact_groups: int, shard_rows: int, extra: dict[str, Any],
) -> dict[str, Any] | None:  # fmt: skip
    from herd.data.curation.sharded_dup_search import sharded_pairs, shards_from_embeddings, shards_from_npy

    if search.method != "clusters":
        raise ValueError(f"the sharded search implements method 'clusters' (got {search.method!r})")
    t0 = time.perf_counter()
    work = out / "sharded"
    if embeddings is not None:
        records = _records_for(source, embeddings) if rank == 0 else None
        n_shards = shards_from_npy(embeddings, work, shard_rows, rank, world)
        extra["embeddings"] = str(embeddings)
    else:
        wd = _embed(source, out, model, embed_cfg, work_dir, rank, world, extra)
        n_shards = wait_for_ranks(wd, world, timeout_s=wait_timeout_s, poll_s=1.0 if world == 1 else 5.0)
        shards_from_embeddings(wd, n_shards, work, rank, world)
        records = (
            [r for i in range(n_shards) for r in read_jsonl(shard_files(wd, i)[1])] if rank == 0 else None
        )
        extra["bad_images"] = sum(
            len(read_jsonl(b)) for i in range(n_shards) if (b := shard_files(wd, i)[2]).is_file()
        )
    pairs = sharded_pairs(work, n_shards, search, rank, world)
    if pairs is None or records is None:
        return None
    extra["bad_records"] = dict(source.bad)
    return write_dedup_outputs(pairs, records, search, out, contact_groups, extra, t0)
