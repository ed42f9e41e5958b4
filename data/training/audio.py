"""Audio training data: a jsonl manifest of `{"audio": path, ...}` records, read lazily.

    data = AudioDataset.from_jsonl("train.jsonl", rank=dp_rank, world_size=dp, max_seconds=60)
    sample = next(iter(data))   # {"key", "audio": (N,) float32 at 16 kHz, "seed", **other fields}

Audio paths are relative to the manifest's folder (or `root`); other fields (`text`, `duration`, ...)
ride along. The manifest is indexed at start-up; an audio file is only opened when its turn comes.

Bad data never stops a run: unparseable lines (`bad_json`), lines that are not objects (`not_an_object`),
records without an audio path (`no_audio_field`), records whose `duration` field already exceeds
`max_seconds` (`too_long`), and files that cannot be used when read — `missing_file`, `empty_file`,
`not_audio`, `empty_audio`, `too_long`, `bad_samples` (`herd.speech.audio.AudioError`'s reasons) and
`too_short` (fewer than `min_samples`) — are skipped and counted by reason in `dataset.skipped` (a
`herd.data.records.SkipCounter`), which the training loop logs. Nothing usable left is `NoUsableRecords`.

Order, sharding by data-parallel rank and resumption: `herd.data.training.record_stream.RecordStream`.
Each sample carries a `seed` drawn from (seed, epoch, record): what a task draws per sample (crop, mask,
noise) is then the same whatever the layout, and differs from one epoch to the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.data.records import SkipCounter, iter_jsonl
from herd.data.training.record_stream import RecordStream, sample_seed
from herd.speech.audio import AudioError, read_audio
from herd.speech.features import WIN_LENGTH


@dataclass(frozen=True)
class AudioRecord:
    key: str
    fields: dict[str, Any]  # the record's other fields (transcript, duration, ...)
    path: str


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
        duration = rec.get("duration")
        if max_seconds is not None and isinstance(duration, int | float) and duration > max_seconds:
            skipped.add("too_long", item.where, f"duration {duration:g} s > {max_seconds:g} s")
            continue
        if check is not None and (reason := check(rec)) is not None:
            skipped.add(reason, item.where)
            continue
        records.append(AudioRecord(str(rec.pop("id", audio)), rec, str(base / audio)))
    return records


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

    def load(self, index: int, epoch: int) -> dict[str, Any] | None:
        rec = self.records[index]
        try:
            audio = read_audio(rec.path, max_seconds=self.max_seconds)
        except AudioError as err:
            self.skipped.add(err.reason, f"{rec.path}#{rec.key}", str(err))
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


__all__ = ["AudioDataset", "AudioRecord", "index_audio_manifest"]
