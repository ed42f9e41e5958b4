"""Batched, sharded, resumable descriptor extraction.

Layout of the work folder (one set of files per work shard XXXXX):
    emb_XXXXX.npy      (n_i, d) float32, L2-normalised descriptors — written last: the done-marker
    ids_XXXXX.jsonl    the n_i records embedded, row-aligned with emb_XXXXX.npy
    bad_XXXXX.jsonl    records whose image could not be decoded (only if any)
    rank_R_of_W.json   written by rank R when all its shards are done (total shard count inside)
    embed_config.json  source + preprocessing; a resume with different settings is refused

Every file is written with an atomic rename, so after a kill a shard either exists completely or
is recomputed; finished shards are never recomputed. Under torchrun, RANK / WORLD_SIZE select the
shards (index % WORLD_SIZE == RANK); no process group is needed because shards share nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from herd.data.curation.image_sources import ImageSource, Sample, WorkShard
from herd.data.curation.sscd import ResizeMode, sscd_transform
from herd.data.records import atomic_save_npy, atomic_write_json, read_jsonl, write_jsonl


@dataclass
class EmbedConfig:
    batch_size: int = 32
    resize: ResizeMode = "square"
    image_size: int | None = None  # None: SSCD defaults (320 square, 288 short edge)
    decode_threads: int = 4  # PIL decoding + resizing releases the GIL for most of its work
    device: str = "cpu"
    progress: bool = True


@dataclass
class EmbedStats:
    computed_shards: int = 0
    skipped_shards: int = 0  # already done in an earlier run
    images: int = 0
    bad_images: int = 0
    seconds: float = 0.0
    shard_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def dist_env() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; (0, 1) when run plainly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def shard_files(work_dir: Path, index: int) -> tuple[Path, Path, Path]:
    return (
        work_dir / f"emb_{index:05d}.npy",
        work_dir / f"ids_{index:05d}.jsonl",
        work_dir / f"bad_{index:05d}.jsonl",
    )


def shard_done(work_dir: Path, index: int) -> bool:
    emb, ids, _ = shard_files(work_dir, index)
    return emb.is_file() and ids.is_file()


def _check_config(work_dir: Path, desc: dict[str, Any]) -> None:
    path = work_dir / "embed_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != desc:
            raise ValueError(
                f"{work_dir} holds embeddings made with other settings:\n  {old}\nvs\n  {desc}\n"
                "use a fresh work folder (finished shards would not match the new settings)"
            )
    else:
        atomic_write_json(path, desc)


def _batches(it: Iterator[Sample], n: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in it:
        batch.append(s)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.inference_mode()
def _forward(model: nn.Module, tensors: list[torch.Tensor], device: str) -> np.ndarray:
    """Descriptors for a list of (3, H, W) tensors; tensors of equal shape are batched together."""
    out = np.zeros((len(tensors), 0), np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(tuple(t.shape), []).append(i)
    for idx in by_shape.values():
        x = torch.stack([tensors[i] for i in idx]).to(device)  # (b, 3, H, W)
        y = model(x).float().cpu().numpy()  # (b, d)
        if out.shape[1] == 0:
            out = np.zeros((len(tensors), y.shape[1]), np.float32)
        out[idx] = y
    # Renormalise: descriptors brought by other models (or half precision) may drift from unit norm.
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _embed_shard(
    shard: WorkShard,
    model: nn.Module,
    transform: Callable[[Any], torch.Tensor],
    cfg: EmbedConfig,
    pool: ThreadPoolExecutor,
    on_batch: Callable[[int], None],
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    def prep(s: Sample) -> torch.Tensor | str:
        try:
            return transform(s.load())
        except Exception as e:  # a corrupt or missing image must not stop a 100M-image job
            return f"{type(e).__name__}: {e}"

    embs: list[np.ndarray] = []
    recs: list[dict[str, Any]] = []
    bads: list[dict[str, Any]] = []
    for batch in _batches(shard.samples(), cfg.batch_size):
        prepared = list(pool.map(prep, batch))
        good = [(s, t) for s, t in zip(batch, prepared) if isinstance(t, torch.Tensor)]
        bads += [{**s.record, "reason": t} for s, t in zip(batch, prepared) if isinstance(t, str)]
        if good:
            embs.append(_forward(model, [t for _, t in good], cfg.device))
            recs += [s.record for s, _ in good]
        on_batch(len(batch))
    d = embs[0].shape[1] if embs else 0
    return (np.concatenate(embs) if embs else np.zeros((0, d), np.float32)), recs, bads


def embed_source(
    source: ImageSource,
    model: nn.Module | Callable[[], nn.Module],
    work_dir: str | Path,
    cfg: EmbedConfig | None = None,
    rank: int = 0,
    world: int = 1,
) -> EmbedStats:
    """Embed every work shard this rank owns that is not already done; returns counts and timing.

    `model` may be a zero-argument factory, called only if some shard still needs embedding."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = cfg or EmbedConfig()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_config(work_dir, {**source.describe(), "resize": cfg.resize, "image_size": cfg.image_size})
    transform = sscd_transform(cfg.resize, cfg.image_size)
    loaded: list[nn.Module] = []

    def get_model() -> nn.Module:
        # Built on the first shard that needs it: a resumed, finished job never loads the weights.
        if not loaded:
            m = model if isinstance(model, nn.Module) else model()
            loaded.append(m.eval().to(cfg.device))
        return loaded[0]

    stats = EmbedStats()
    t_start = time.perf_counter()
    columns = (
        TextColumn("[bold]embed[/] rank {task.fields[rank]}"),
        BarColumn(),
        TextColumn("{task.description}"),
    )
    with (
        ThreadPoolExecutor(max(1, cfg.decode_threads)) as pool,
        Progress(*columns, TimeElapsedColumn(), disable=not cfg.progress) as progress,
    ):
        task = progress.add_task("", total=None, rank=rank)
        for shard in source.iter_shards(rank, world):
            if shard_done(work_dir, shard.index):
                stats.skipped_shards += 1
                continue
            t0 = time.perf_counter()

            def on_batch(n: int, index: int = shard.index) -> None:
                stats.images += n
                rate = stats.images / max(time.perf_counter() - t_start, 1e-9)
                progress.update(
                    task, advance=n, description=f"shard {index}: {stats.images} img, {rate:.1f} img/s"
                )

            emb, recs, bads = _embed_shard(shard, get_model(), transform, cfg, pool, on_batch)
            emb_p, ids_p, bad_p = shard_files(work_dir, shard.index)
            if bads:
                write_jsonl(bad_p, bads)
            write_jsonl(ids_p, recs)
            atomic_save_npy(emb_p, emb.astype(np.float32))  # last: its existence marks the shard done
            stats.bad_images += len(bads)
            stats.computed_shards += 1
            stats.shard_seconds[shard.index] = time.perf_counter() - t0
    stats.seconds = time.perf_counter() - t_start
    atomic_write_json(work_dir / f"rank_{rank}_of_{world}.json", {"n_shards": source.n_shards, "rank": rank})
    return stats


def wait_for_ranks(work_dir: str | Path, world: int, timeout_s: float = 86400.0, poll_s: float = 5.0) -> int:
    """Block until every rank has written its completion file; returns the total shard count."""
    work_dir = Path(work_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        files = [work_dir / f"rank_{r}_of_{world}.json" for r in range(world)]
        if all(f.is_file() for f in files):
            return int(json.loads(files[0].read_text())["n_shards"])
        if time.monotonic() > deadline:
            missing = [f.name for f in files if not f.is_file()]
            raise TimeoutError(f"ranks not finished after {timeout_s:.0f}s: {missing}")
        time.sleep(poll_s)


def load_embeddings(work_dir: str | Path, n_shards: int) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Concatenate shards 0..n_shards-1 in order → (X (n, d) float32, records, number of bad images)."""
    work_dir = Path(work_dir)
    xs, recs, n_bad = [], [], 0
    for i in range(n_shards):
        emb_p, ids_p, bad_p = shard_files(work_dir, i)
        if not shard_done(work_dir, i):
            raise FileNotFoundError(f"work shard {i} is missing in {work_dir} (did every rank finish?)")
        x = np.load(emb_p)
        r = read_jsonl(ids_p)
        if len(r) != len(x):
            raise ValueError(f"shard {i}: {len(x)} embeddings but {len(r)} records")
        if len(x):
            xs.append(x)
        recs += r
        if bad_p.is_file():
            n_bad += len(read_jsonl(bad_p))
    if not xs:
        return np.zeros((0, 0), np.float32), recs, n_bad
    return np.ascontiguousarray(np.concatenate(xs), dtype=np.float32), recs, n_bad
