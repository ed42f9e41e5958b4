"""Audio training data: a jsonl manifest of `{"audio": path, ...}` records, or webdataset tar shards, read
lazily.

    data = AudioDataset.from_jsonl("train.jsonl", rank=dp_rank, world_size=dp, max_seconds=60)
    data = AudioDataset.from_tar_shards("shards/", rank=dp_rank, world_size=dp, max_seconds=60)
    sample = next(iter(data))   # {"key", "audio": (N,) float32 at 16 kHz, "seed", **other fields}

Manifest: audio paths are relative to the manifest's folder (or `root`); other fields (`text`, `duration`,
...) ride along. Tar shards: the layout of `herd.data.training.image_text` (whose indexer is used, with
the `AUDIO` media hook): `key.wav|flac|mp3|ogg|opus|m4a|webm` plus `key.json` (fields, `id` → the key)
and/or `key.txt` (→ "text"); `paths` are shard files, a folder (all its `*.tar`) or a glob.
`write_audio_tar_shards(manifest, out_dir)` copies a manifest into shards, which then yield the same
samples in the same order. Either way the index is built at start-up (for shards: from the tar headers
and text members) and the audio is only read when its turn comes (from a shard: one seek).

Bad data never stops a run: unparseable lines (`bad_json`), lines that are not objects (`not_an_object`),
records without an audio path (`no_audio_field`), records whose `duration` field already exceeds
`max_seconds` (`too_long`), and files that cannot be used when read — `missing_file`, `empty_file`,
`not_audio`, `empty_audio`, `too_long`, `bad_samples` (`herd.speech.audio.AudioError`'s reasons) and
`too_short` (fewer than `min_samples`) — are skipped and counted by reason in `dataset.skipped` (a
`herd.data.records.SkipCounter`), which the training loop logs. Shards add the indexer's reasons:
samples without an audio member (`no_audio`), bad `.json`/`.txt` members (`bad_text_member`), shards
cut short (`truncated_shard`: the samples before the cut are kept) and files that are no tar
(`unreadable_shard`). Nothing usable left is `NoUsableRecords`.

Order, sharding by data-parallel rank and resumption: `herd.data.training.record_stream.RecordStream`.
Each sample carries a `seed` drawn from (seed, epoch, record): what a task draws per sample (crop, mask,
noise) is then the same whatever the layout, and differs from one epoch to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from herd.data.records import SkipCounter, iter_jsonl
from herd.data.training.image_text import Media, Record, index_tar_shards, shard_paths, write_tar_shards
from herd.data.training.record_stream import RecordStream, sample_seed
from herd.speech.audio import AudioError, read_audio, read_audio_bytes
from herd.speech.features import WIN_LENGTH

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm")
AUDIO = Media("audio", AUDIO_EXTS, ".wav")  # the decoders go by content; the extension marks the member

# key, fields (transcript, duration, ...), path: the audio file, or the tar shard holding it at
# (offset, size) — `image_text.Record`, whose `in_shard` and `media_bytes()` the dataset uses.
AudioRecord = Record


# A record check: the fields of a record → the reason it cannot be used, or None.
RecordCheck = Callable[[dict[str, Any]], str | None]


def index_audio_manifest(
    manifest: str | Path,
    root: str | Path | None = None,
    skipped: SkipCounter | None = None,
    check: RecordCheck | None = None,
    max_seconds: float | None = None,
) -> list[AudioRecord]:
    """Records of a jsonl manifest in line order; audio files are not opened."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: audio manifest not found")
    base = Path(root) if root is not None else manifest.parent
    skipped = skipped if skipped is not None else SkipCounter()
    records = []
    for item in iter_jsonl(manifest):
        if item.record is None:
            skipped.add(item.bad or "bad_record", item.where)
            continue
        rec = dict(item.record)
        audio = rec.pop("audio", None)
        if not isinstance(audio, str) or not audio:
            skipped.add("no_audio_field", item.where)
            continue
        if (detail := _too_long(rec, max_seconds)) is not None:
            skipped.add("too_long", item.where, detail)
            continue
        if check is not None and (reason := check(rec)) is not None:
            skipped.add(reason, item.where)
            continue
        records.append(AudioRecord(str(rec.pop("id", audio)), rec, str(base / audio)))
    return records


def _too_long(fields: dict[str, Any], max_seconds: float | None) -> str | None:
    """Why a record's `duration` field already exceeds `max_seconds`, or None."""
    duration = fields.get("duration")
    if max_seconds is not None and isinstance(duration, int | float) and duration > max_seconds:
        return f"duration {duration:g} s > {max_seconds:g} s"
    return None


def index_audio_shards(
    paths: Iterable[str | Path],
    skipped: SkipCounter | None = None,
    check: RecordCheck | None = None,
    max_seconds: float | None = None,
) -> list[AudioRecord]:
    """Records of webdataset shards (sorted by path; `image_text.index_tar_shards` with the `AUDIO` hook);
    a `duration` over `max_seconds` is `too_long`, checked before `check` as for a manifest."""

    def shard_check(fields: dict[str, Any]) -> str | None:
        if _too_long(fields, max_seconds) is not None:
            return "too_long"
        return check(fields) if check is not None else None

    return index_tar_shards(paths, skipped, shard_check, AUDIO)


def decode_audio(rec: AudioRecord, max_seconds: float | None = None) -> torch.Tensor:
    """The record's waveform: from its file, or from its byte range in a shard (errors then name
    `shard.tar#key`)."""
    if rec.in_shard:
        return read_audio_bytes(rec.media_bytes(), f"{rec.path}#{rec.key}", max_seconds)
    return read_audio(rec.path, max_seconds=max_seconds)


class AudioDataset(RecordStream):
    """Shuffled, rank-sharded, resumable stream of `{"key", "audio", "seed", **fields}` (module docstring)."""

    what = "audio file"

    def __init__(
        self,
        records: list[AudioRecord],
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        skipped: SkipCounter | None = None,
        max_seconds: float | None = None,
        min_samples: int = WIN_LENGTH,
    ) -> None:
        super().__init__(len(records), rank, world_size, seed, shuffle, loop, skipped)
        self.records, self.max_seconds, self.min_samples = list(records), max_seconds, min_samples

    @classmethod
    def from_jsonl(
        cls,
        manifest: str | Path,
        root: str | Path | None = None,
        check: RecordCheck | None = None,
        max_seconds: float | None = None,
        **kw: Any,
    ) -> AudioDataset:
        skipped = SkipCounter()
        records = index_audio_manifest(manifest, root, skipped, check, max_seconds)
        return cls(records, skipped=skipped, max_seconds=max_seconds, **kw)

    @classmethod
    def from_tar_shards(
        cls,
        paths: str | Path | Iterable[str | Path],
        check: RecordCheck | None = None,
        max_seconds: float | None = None,
        **kw: Any,
    ) -> AudioDataset:
        """`paths`: shard files, a folder (all its `*.tar`) or a glob pattern ("shards/*.tar")."""
        skipped = SkipCounter()
        records = index_audio_shards(shard_paths(paths), skipped, check, max_seconds)
        return cls(records, skipped=skipped, max_seconds=max_seconds, **kw)

    def load(self, index: int, epoch: int) -> dict[str, Any] | None:
        rec = self.records[index]
        try:
            audio = decode_audio(rec, self.max_seconds)
        except AudioError as err:
            self.skipped.add(err.reason, f"{rec.path}#{rec.key}", str(err))
            return None
        except FileNotFoundError as err:  # a shard deleted after indexing
            self.skipped.add("missing_file", f"{rec.path}#{rec.key}", str(err))
            return None
        except Exception as err:  # a decoder failing in a way we did not foresee must not stop a run either
            self.skipped.add("decode_error", f"{rec.path}#{rec.key}", f"{type(err).__name__}: {err}")
            return None
        if audio.numel() < self.min_samples:
            self.skipped.add(
                "too_short", f"{rec.path}#{rec.key}", f"{audio.numel()} samples < {self.min_samples}"
            )
            return None
        return {"key": rec.key, **rec.fields, "audio": audio, "seed": sample_seed(self.seed, epoch, index)}


def write_audio_tar_shards(
    manifest: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    root: str | Path | None = None,
    prefix: str = "shard",
) -> list[Path]:
    """Copy an audio manifest + folder into webdataset shards `{prefix}-000000.tar`, … in manifest order.

    `image_text.write_tar_shards` with the `AUDIO` hook: members `000000007.flac` (the file's own
    extension when it is one of `AUDIO_EXTS`, else .wav) and `000000007.json` holding the manifest's id
    (its audio path when it has none) and other fields. Bytes are copied as they are, so a bad file is
    counted by the reader as from the manifest; missing files are left out.
    """
    return write_tar_shards(manifest, out_dir, samples_per_shard, root, prefix, media=AUDIO)


__all__ = [
    "AUDIO",
    "AUDIO_EXTS",
    "AudioDataset",
    "AudioRecord",
    "decode_audio",
    "index_audio_manifest",
    "index_audio_shards",
    "write_audio_tar_shards",
]
