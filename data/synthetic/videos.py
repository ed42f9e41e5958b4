"""Generated video files with known content, for the video reader's tests, benchmarks and (later) the
video quickstart: coloured squares moving across a gradient, written with PyAV.

Frame k of a generated video is `moving_squares(k, width, height)`: a red square moving right by 7 px per
frame and a green one moving down by 3 px on a background whose blue channel is 9·k mod 256, so every
frame differs from its neighbours and a frame's index can be read back from its pixels (`frame_number`).
`write_video` can give every frame its own presentation time (a variable frame rate), set the display
rotation of phone videos, hold frame 0 throughout (`still=True`, a static video for the motion filter),
and use any encoder PyAV's FFmpeg has (H.264, MPEG-4, VP9). Also:
`write_audio_only` (an .m4a with a tone and no video stream) and `truncate` (a file cut short).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from os import PathLike
from pathlib import Path

import numpy as np


def moving_squares(k: int, width: int, height: int) -> np.ndarray:
    """Frame k: (height, width, 3) uint8 RGB."""
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack(
        [xx * 255 // max(1, width - 1), yy * 255 // max(1, height - 1), np.full_like(xx, (9 * k) % 256)], -1
    ).astype(np.uint8)
    s = max(2, min(width, height) // 4)
    x, y = (7 * k) % max(1, width - s), (3 * k) % max(1, height - s)
    img[height // 4 : height // 4 + s, x : x + s] = (255, 0, 0)
    img[y : y + s, width // 2 : width // 2 + s] = (0, 255, 0)
    return img


def frame_number(frame: np.ndarray, width: int, height: int, num_frames: int) -> int:
    """The k < num_frames whose generated frame is closest to `frame` (H, W, 3): reads a sample back."""
    errors = [
        np.abs(frame.astype(np.int32) - moving_squares(k, width, height)).mean() for k in range(num_frames)
    ]
    return int(np.argmin(errors))


def write_video(
    path: str | PathLike,
    num_frames: int,
    fps: int = 24,
    width: int = 64,
    height: int = 48,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    times_ms: Sequence[int] | None = None,  # presentation time of every frame (a variable frame rate)
    rotation: int = 0,  # display rotation in degrees, counter-clockwise (as phones write it)
    container_format: str | None = None,  # e.g. "webm"; None = from the file name
    faststart: bool = False,  # mp4: the index (moov) before the frames, as streaming servers want it
    still: bool = False,  # every frame is frame 0: a static video (motion score ≈ 0)
) -> Path:
    """Write `num_frames` frames of `moving_squares`; returns the path."""
    import av

    out = Path(path)
    if times_ms is not None and len(times_ms) != num_frames:
        raise ValueError(f"times_ms has {len(times_ms)} entries for {num_frames} frames")
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(out), "w", format=container_format, options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for k in range(num_frames):
            picture = moving_squares(0 if still else k, width, height)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = int(times_ms[k]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def write_audio_only(path: str | PathLike, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """An AAC .m4a (an mp4 container) holding a 440 Hz tone and no video stream."""
    import av

    out = Path(path)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # (1, samples)
    with av.open(str(out), "w") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = "mono"
        for i in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, i : i + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def truncate(src: str | PathLike, dst: str | PathLike, fraction: float = 0.5) -> Path:
    """The first `fraction` of `src`'s bytes, as a download or copy cut short leaves it."""
    data = Path(src).read_bytes()
    out = Path(dst)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


__all__ = ["frame_number", "moving_squares", "truncate", "write_audio_only", "write_video"]
