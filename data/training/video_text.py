"""Video-text training data (paper §7.2–7.4): a jsonl manifest + video folder, or webdataset tar shards.

The same machinery as image-text data (`herd.data.training.image_text`: one `Record` list for both
formats, a permutation per epoch, rank sharding in lockstep, exact resumption, bad records skipped and
counted), through its media hook: `VIDEO` names the field and the tar member extensions, and
`VideoTextDataset` decodes a record with `herd.vision.video.read_frames`.

  * manifest: one json object per line, `{"video": relpath, "caption"/"text": …, "question": …,
    "answer": …, "question_type": …}`; video paths are relative to the manifest's folder (or `root`);
  * tar shards: `key.mp4|webm|mkv|avi|mov` plus `key.json` (fields) and/or `key.txt` (→ "text"),
    uncompressed `.tar`, as `write_video_tar_shards` writes them from a manifest.

A video inside a shard is decoded from its bytes in memory, not extracted to a temporary file: both
readers open bytes (PyAV through a file object, decord copies any file object into memory itself), a
clip is a few MB, and nothing is left on disk when a run is killed or `/tmp` is small or read-only.

Skip reasons (`dataset.skipped`): those of indexing (`bad_json`, `no_video_field`, `no_video`,
`bad_text_member`, `truncated_shard`, `unreadable_shard`, and `check`'s own, e.g. a QA objective's
missing answer) and every `VideoReadError.reason` met when decoding (`missing`, `empty`, `not_a_video`,
`audio_only`, `corrupt`, `truncated`). A bad video is remembered and its round is served by the rank's
next readable record, so ranks stay in lockstep.

Sample: `{"key", **fields, "video": VideoFrames}` with `num_frames` frames sampled uniformly over the
whole video (repeats masked), ready for `video_tiles` and `collate_videos`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from herd.data.records import SkipCounter
from herd.data.training.image_text import Media, MediaTextDataset, Record, write_tar_shards
from herd.vision.video import VIDEO_EXTS, Backend, VideoFrames, VideoReadError, read_frames

VIDEO = Media("video", VIDEO_EXTS, ".mp4")


def decode_video(rec: Record, num_frames: int, backend: Backend = "auto") -> VideoFrames:
    """The record's video, `num_frames` frames sampled: from its file, or from its byte range in a shard
    (errors then name `shard.tar#key`)."""
    if rec.in_shard:
        return read_frames(rec.media_bytes(), num_frames, backend, name=f"{rec.path}#{rec.key}")
    return read_frames(rec.path, num_frames, backend)


def video_failure_reason(err: BaseException) -> str:
    """The skip reason of a decoding error: the reader's own, or where the shard itself is gone."""
    if isinstance(err, VideoReadError):
        return err.reason
    if isinstance(err, FileNotFoundError):  # a shard deleted after indexing
        return "missing"
    return "corrupt"  # a decoder failure the reader did not classify: the file cannot be used either way


class VideoTextDataset(MediaTextDataset):
    """Shuffled, rank-sharded, resumable stream of `{"key", **text fields, "video": VideoFrames}`.

    num_frames: frames sampled per video (paper: 16 in pretraining, 64 in SFT); backend: "auto" (decord,
    PyAV where decord is missing or fails), "decord" or "pyav". Other arguments as `ImageTextDataset`:
    rank / world_size (data parallel), seed, shuffle, loop, skipped. Build one with `from_jsonl(manifest,
    num_frames=…)` or `from_tar_shards(paths, num_frames=…)`.
    """

    media = VIDEO

    def __init__(
        self,
        records: Sequence[Record],
        num_frames: int,
        backend: Backend = "auto",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        skipped: SkipCounter | None = None,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
        if backend not in ("auto", "decord", "pyav"):
            raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', not {backend!r}")
        self.num_frames, self.backend = num_frames, backend
        super().__init__(records, rank, world_size, seed, shuffle, loop, skipped)

    def _decode(self, rec: Record) -> VideoFrames:
        return decode_video(rec, self.num_frames, self.backend)

    def _failure_reason(self, err: BaseException) -> str:
        return video_failure_reason(err)


def write_video_tar_shards(
    manifest: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    root: str | Path | None = None,
    prefix: str = "shard",
) -> list[Path]:
    """Copy a video manifest + folder into webdataset shards (bytes as they are; missing files left out).

    `write_tar_shards` with the video hook: members `000000007.mp4` (the file's own extension when it is
    one of `VIDEO_EXTS`, else .mp4) and `000000007.json` holding the manifest's id and text fields.
    """
    return write_tar_shards(manifest, out_dir, samples_per_shard, root, prefix, media=VIDEO)


__all__ = [
    "VIDEO",
    "VideoTextDataset",
    "decode_video",
    "video_failure_reason",
    "write_video_tar_shards",
]
