"""Video frames for the video adapter (paper §7.2.3): decode a file, sample N frames uniformly over the
whole video, and turn them into the image encoder's tiles.

    read_frames("clip.mp4", 64) → VideoFrames: frames (64, H, W, 3) uint8, mask (64,), timestamps (64,)
    video_tiles(frames, ImageTransform(...)) → pixel_values (64, K, 3, S, S) + ids, tile mask, frame mask
    collate_videos([...]) → the `video_*` keyword inputs of `MultimodalLlama`

Readers. decord (the design's choice: random access to the sampled frames) where it is installed (its
0.6.0 wheel exists for x86_64 Linux and Windows only); PyAV (`av`, wheels with their own FFmpeg for every
platform) where it is not, or when decord fails on a file. Every file is first probed with PyAV (streams,
declared frame count, rotation, one decoded frame), so a bad file gets the same error from either reader.
Both readers give the same frames: on the generated test videos (H.264, MPEG-4, VP9; 4:2:0 and 4:4:4;
odd sizes; variable frame rate; rotated) they were bit-identical, and the test allows ±2 per uint8
channel for FFmpeg builds that convert YUV → RGB differently (docs/video.md).

decord's memory growth (dmlc/decord #197, #208: a reader left mid-stream keeps decoded frames buffered):
each call opens its own `VideoReader`, seeks it back to frame 0 after `get_batch` and drops it; the
benchmark `benchmarks/video_adapter_throughput.py` measures RSS over 1,000 reads with and without this.

Sources: a path, or the file's bytes (a video inside a tar shard) with a `name` for error messages. Both
readers open bytes in memory (PyAV through a file object; decord copies any file object into memory
anyway), so a shard member needs no temporary file.

Sampling (`sample_frame_indices`): frame i of N is the frame shown at time t_i = t_0 + (i + ½)·span/N,
span = the video's length (first frame's start to last frame's end); for a constant frame rate this is
index ⌊(2i + 1)·n / 2N⌋, computed in integers so both readers pick the same frames. Variable frame rate:
sampled by time (a burst of short frames does not crowd the sample). A video with fewer than N frames
(or a frame held longer than span/N) yields repeated frames; `mask` is False for every repeat, so the
resampler ignores them while frame i keeps its place on the time axis. Rotation metadata (the display
matrix of phone videos) is applied: frames come out as they are displayed. Odd sizes and any aspect ratio
pass through unchanged; the image transform fits them to its canvas.

Errors: `VideoReadError` names the file and one reason of `READ_ERRORS` (`missing`, `empty`,
`not_a_video`, `audio_only`, `corrupt`, `truncated`); a dataset counts `error.reason` and skips the record.

Shapes: N frames sampled, n frames in the video, K tiles, S tile size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from herd.vision.tiling import ImageTransform

Backend = Literal["auto", "decord", "pyav"]
VideoSource = str | PathLike | bytes  # a file, or a whole file's bytes (e.g. a tar shard's member)
VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")  # file names a dataset or tar shard takes as video
READ_ERRORS = ("missing", "empty", "not_a_video", "audio_only", "corrupt", "truncated")
# An index that lists more frames than this fraction decode means the file was cut short.
TRUNCATION_FRACTION = 0.9
_CONTAINER_MAGIC = (b"ftyp", b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV", b"\x00\x00\x01\xba")


class VideoReadError(ValueError):
    """A video that cannot be read; `reason` is one of `READ_ERRORS`, the message names the file."""

    def __init__(self, path: str | PathLike, reason: str, detail: str) -> None:
        assert reason in READ_ERRORS, reason
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {detail} ({reason})")


@dataclass
class VideoFrames:
    """N frames sampled from one video, in display orientation."""

    frames: torch.Tensor  # (N, H, W, 3) uint8
    mask: torch.Tensor  # (N,) bool; False = a repeat of the frame before it (short video, long frame)
    timestamps: torch.Tensor  # (N,) float64, seconds: presentation time of each frame
    indices: torch.Tensor  # (N,) int64: each frame's index in the video (presentation order)
    num_video_frames: int  # n, the frames the video has
    duration: float  # seconds from the first frame's start to the last frame's end
    rotation: int  # degrees counter-clockwise applied to the decoded pictures (0, 90, 180, 270)
    reader: str  # "decord" or "pyav"
    path: str


@dataclass(frozen=True)
class _Input:
    """Where the video's bytes are: a file (`path`) or memory (`data`); `name` is what errors say."""

    name: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> str | io.BytesIO:
        """What `av.open` and `decord.VideoReader` accept: a path string or a fresh file object."""
        return str(self.path) if self.path is not None else io.BytesIO(self.data or b"")

    def head(self, n: int = 16) -> bytes:
        if self.path is None:
            return (self.data or b"")[:n]
        with open(self.path, "rb") as f:
            return f.read(n)


def sample_frame_indices(
    starts: Sequence[float] | np.ndarray, num_frames: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (N,) of the frames shown at N uniformly spaced times, and the mask (N,) of first occurrences.

    `starts` are the frames' presentation times in seconds, ascending. Times are compared in whole
    milliseconds, so decord's float32 timestamps and PyAV's exact ones choose the same frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
    ms = np.round(np.asarray(starts, dtype=np.float64) * 1000.0)
    n, i = len(ms), np.arange(num_frames)
    if n == 0:
        raise ValueError("a video with no frames has nothing to sample")
    steps = np.diff(ms)
    if n == 1 or steps.max() - steps.min() <= 1:  # constant frame rate (1 ms of rounding allowed)
        idx = ((2 * i + 1) * n) // (2 * num_frames)
    else:  # variable frame rate: by time; the last frame lasts one mean interval
        span = (ms[-1] - ms[0]) * n / (n - 1)
        times = ms[0] + (i + 0.5) * span / num_frames
        idx = np.clip(np.searchsorted(ms, times, side="right") - 1, 0, n - 1)
    mask = np.ones(num_frames, dtype=bool)
    mask[1:] = idx[1:] != idx[:-1]
    return idx.astype(np.int64), mask


# --- probing ------------------------------------------------------------------------------------------
@dataclass
class _Probe:
    declared_frames: int  # the container's frame count, 0 when it does not say
    rotation: int
    size: tuple[int, int]  # (height, width) as decoded, before rotation


def _import_av() -> ModuleType:
    try:
        import av
    except ImportError as e:  # pragma: no cover - the video extra installs it
        raise ImportError("reading videos needs PyAV: pip install 'herd[video]' (or pip install av)") from e
    return av


@cache
def _decord() -> ModuleType | None:
    """decord if it imports (no wheel for aarch64 or macOS: then PyAV reads everything)."""
    try:
        import decord
    except Exception:  # ImportError, or a wheel whose native library does not load
        return None
    return decord


def decord_available() -> bool:
    return _decord() is not None


def _looks_like_media(src: _Input) -> bool:
    """A container signature in the first bytes: the file is a damaged video rather than another file."""
    head = src.head()
    return any(m in head for m in _CONTAINER_MAGIC)


def _probe(src: _Input) -> _Probe:
    """Streams, declared frame count, rotation; decodes the first frame so an undecodable file fails here."""
    av = _import_av()
    path = src.name
    try:
        container = av.open(src.open())
    except Exception as e:
        if _looks_like_media(src):
            raise VideoReadError(path, "corrupt", f"damaged or truncated container ({e})") from e
        raise VideoReadError(path, "not_a_video", f"no video container FFmpeg recognises ({e})") from e
    with container:
        fmt = container.format.name
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            if container.streams.audio:
                raise VideoReadError(path, "audio_only", f"no video stream, only {', '.join(kinds)}")
            raise VideoReadError(path, "not_a_video", f"no video stream (streams: {kinds or 'none'})")
        if fmt == "image2" or fmt.endswith("_pipe"):
            raise VideoReadError(path, "not_a_video", f"a still image ({fmt}), not a video")
        stream = container.streams.video[0]
        try:
            first = next(iter(container.decode(stream)), None)
        except Exception as e:
            raise VideoReadError(path, "corrupt", f"the first frame does not decode ({e})") from e
        if first is None:
            raise VideoReadError(path, "corrupt", "the video stream has no decodable frame")
        rotation = int(round(float(getattr(first, "rotation", 0) or 0) / 90.0)) * 90 % 360
        return _Probe(int(stream.frames or 0), rotation, (first.height, first.width))


def _check_complete(path: str, found: int, probe: _Probe, reader: str) -> None:
    if found == 0:
        raise VideoReadError(path, "corrupt", f"{reader} finds no frame")
    if probe.declared_frames and found < TRUNCATION_FRACTION * probe.declared_frames:
        raise VideoReadError(
            path, "truncated", f"the index lists {probe.declared_frames} frames, {found} are in the file"
        )


# --- the two readers ----------------------------------------------------------------------------------
def _read_decord(
    src: _Input, num_frames: int, probe: _Probe
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    decord = _decord()
    assert decord is not None
    path = src.name
    reader = decord.VideoReader(src.open(), ctx=decord.cpu(0))
    try:
        n = len(reader)
        _check_complete(path, n, probe, "decord")
        starts = reader.get_frame_timestamp(list(range(n)))[:, 0].astype(np.float64)  # (n,)
        idx, mask = sample_frame_indices(starts, num_frames)
        unique = np.unique(idx)
        batch = reader.get_batch(unique.tolist()).asnumpy()  # (U, H, W, 3), already rotated by decord
        reader.seek(0)  # decord #197/#208: release the frames it buffered past the last one read
    finally:
        del reader
    return batch[np.searchsorted(unique, idx)], mask, idx, starts


def _read_pyav(
    src: _Input, num_frames: int, probe: _Probe
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    av = _import_av()
    path = src.name
    with av.open(src.open()) as container:  # pass 1: packet times only, nothing decoded
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        pts = [p.pts if p.pts is not None else p.dts for p in container.demux(stream) if p.size]
    if not pts or any(t is None for t in pts):  # no packet timestamps: decode once to count the frames
        with av.open(src.open()) as container:
            rate = float(container.streams.video[0].average_rate or 25)
            times = [f.time for f in container.decode(video=0)]
        pts, tb = [k / rate if t is None else t for k, t in enumerate(times)], 1.0
    _check_complete(path, len(pts), probe, "PyAV")
    starts = np.sort(np.asarray(pts, dtype=np.float64)) * tb  # (n,) presentation order
    idx, mask = sample_frame_indices(starts, num_frames)
    wanted, got = set(idx.tolist()), {}
    last = int(idx.max())
    with av.open(src.open()) as container:  # pass 2: decode in order, convert only the sampled frames
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for k, frame in enumerate(container.decode(stream)):  # frames leave the decoder in display order
            if k in wanted:
                got[k] = frame.to_ndarray(format="rgb24")  # (H, W, 3)
            if k >= last:
                break
    if len(got) < len(wanted):
        raise VideoReadError(
            path, "truncated", f"frame {max(wanted - set(got))} of {len(pts)} does not decode"
        )
    turns = probe.rotation // 90  # display matrix: counter-clockwise degrees, as FFmpeg's autorotate
    frames = np.stack([np.rot90(got[k], turns) if turns else got[k] for k in idx.tolist()])
    return np.ascontiguousarray(frames), mask, idx, starts


def _input(source: VideoSource, name: str | None) -> _Input:
    """Checks that need no decoder: a file that is missing, a folder or empty; empty bytes."""
    if isinstance(source, bytes | bytearray | memoryview):
        src = _Input(name or "<bytes>", data=bytes(source))
        if not src.data:
            raise VideoReadError(src.name, "empty", "no bytes (0 bytes)")
        return src
    file = Path(source)
    src = _Input(name or str(file), path=file)
    if not file.exists():
        raise VideoReadError(src.name, "missing", "no such file")
    if not file.is_file():
        raise VideoReadError(src.name, "not_a_video", "a directory, not a video file")
    if file.stat().st_size == 0:
        raise VideoReadError(src.name, "empty", "the file is empty (0 bytes)")
    return src


def read_frames(
    source: VideoSource, num_frames: int, backend: Backend = "auto", name: str | None = None
) -> VideoFrames:
    """N frames sampled uniformly over the whole video (rules in the module docstring).

    source: a path, or a whole video file's bytes (`name`, e.g. "shard.tar#key", is what errors and
    `VideoFrames.path` then say). backend: "auto" = decord when installed, PyAV when it is not or when
    decord fails on this file; "decord" or "pyav" = that reader only. Raises `VideoReadError` naming the
    file and the reason.
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', not {backend!r}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be ≥ 1, got {num_frames}")
    src = _input(source, name)
    probe = _probe(src)
    if backend == "decord" and _decord() is None:
        raise ImportError("backend='decord' but decord is not installed (pip install decord; x86_64 only)")
    out, reader = None, "pyav"
    if backend != "pyav" and _decord() is not None:
        try:
            out, reader = _read_decord(src, num_frames, probe), "decord"
        except VideoReadError:
            raise
        except Exception as e:
            if backend == "decord":
                raise VideoReadError(
                    src.name, "corrupt", f"decord cannot read it ({type(e).__name__}: {e})"
                ) from e
            out = None  # PyAV reads what decord's FFmpeg build cannot
    if out is None:
        out = _read_pyav(src, num_frames, probe)
    frames, mask, idx, starts = out
    n = len(starts)
    span = float(starts[-1] - starts[0]) * n / (n - 1) if n > 1 else 0.0
    return VideoFrames(
        frames=torch.from_numpy(frames),
        mask=torch.from_numpy(mask),
        timestamps=torch.from_numpy(starts[idx]),
        indices=torch.from_numpy(idx),
        num_video_frames=n,
        duration=span,
        rotation=probe.rotation,
        reader=reader,
        path=src.name,
    )


# --- frames → the encoder's tiles ---------------------------------------------------------------------
def video_tiles(video: VideoFrames, transform: ImageTransform) -> dict[str, torch.Tensor]:
    """Each frame through the image transform the encoder was built for (same canvas rule as images).

    Returns pixel_values (N, K, 3, S, S) float32, aspect_ratio_ids (N,), aspect_ratio_mask (N, K) and
    frame_mask (N,) bool. A repeated frame (mask False) is copied, not transformed again.
    """
    from PIL import Image

    tiled: list[Any] = []
    for k, frame in enumerate(video.frames):
        if k > 0 and not bool(video.mask[k]):
            tiled.append(tiled[-1])
        else:
            tiled.append(transform(Image.fromarray(frame.numpy())))
    return {
        "pixel_values": torch.stack([t.pixel_values for t in tiled]),
        "aspect_ratio_ids": torch.tensor([t.aspect_ratio_id for t in tiled], dtype=torch.long),
        "aspect_ratio_mask": torch.stack([t.aspect_ratio_mask for t in tiled]),
        "frame_mask": video.mask.clone(),
    }


def collate_videos(
    videos: Sequence[dict[str, torch.Tensor]], num_frames: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack `video_tiles` outputs into `MultimodalLlama`'s video inputs (one video per sample).

    Returns video_pixel_values (B, F, K, 3, S, S), video_aspect_ratio_ids (B, F), video_aspect_ratio_mask
    (B, F, K) and video_frame_mask (B, F); F = `num_frames` or the longest video. Padding frames are
    zeros with id 0 and their first tile marked (the encoder runs on every slot, as for padding images)
    and frame_mask False, so the resampler ignores them.
    """
    if not videos:
        raise ValueError("collate_videos needs at least one video")
    longest = max(v["pixel_values"].shape[0] for v in videos)
    F = longest if num_frames is None else num_frames
    if longest > F:
        raise ValueError(f"a video has {longest} frames, more than num_frames={F}")
    _, K, C, S, _ = videos[0]["pixel_values"].shape
    B = len(videos)
    pixels = torch.zeros(B, F, K, C, S, S)
    ids = torch.zeros(B, F, dtype=torch.long)
    tiles = torch.zeros(B, F, K, dtype=torch.long)
    tiles[:, :, 0] = 1
    frame_mask = torch.zeros(B, F, dtype=torch.bool)
    for b, v in enumerate(videos):
        n = v["pixel_values"].shape[0]
        if v["pixel_values"].shape[1:] != (K, C, S, S):
            raise ValueError(
                f"video {b} has tiles {tuple(v['pixel_values'].shape[1:])}, expected {(K, C, S, S)}"
            )
        pixels[b, :n], ids[b, :n], tiles[b, :n] = (
            v["pixel_values"],
            v["aspect_ratio_ids"],
            v["aspect_ratio_mask"],
        )
        frame_mask[b, :n] = v["frame_mask"]
    return {
        "video_pixel_values": pixels,
        "video_aspect_ratio_ids": ids,
        "video_aspect_ratio_mask": tiles,
        "video_frame_mask": frame_mask,
    }


__all__ = [
    "READ_ERRORS",
    "VIDEO_EXTS",
    "VideoFrames",
    "VideoReadError",
    "VideoSource",
    "collate_videos",
    "decord_available",
    "read_frames",
    "sample_frame_indices",
    "video_tiles",
]
