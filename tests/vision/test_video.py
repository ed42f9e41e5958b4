"""Video frames (herd.vision.video) on generated files: decord and PyAV give the same frames, the sampled
frames are the ones the uniform rule names (read back from their pixels), short / variable-frame-rate /
rotated / odd-sized videos, every failure an error naming the file, the PyAV-only path, frames → tiles.

Parity tolerance: the two readers decode the same bitstream with FFmpeg and convert YUV → RGB with
swscale; builds may round differently, so ±2 per uint8 channel is allowed. Measured on every file here
(decord 0.6.0's bundled FFmpeg vs PyAV 18.1's FFmpeg 8.1): max |diff| = 0, the frames are identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from herd.data.records import SkipCounter  # noqa: E402
from herd.data.synthetic.videos import (  # noqa: E402
    frame_number,
    moving_squares,
    truncate,
    write_audio_only,
    write_video,
)
from herd.vision import video as video_mod  # noqa: E402
from herd.vision.tiling import ImageTransform  # noqa: E402
from herd.vision.video import (  # noqa: E402
    VideoReadError,
    collate_videos,
    decord_available,
    read_frames,
    sample_frame_indices,
    video_tiles,
)

PARITY_TOLERANCE = 2  # uint8 levels
VFR_TIMES_MS = [0, 40, 80, 300, 320, 340, 900, 1000, 1100, 1500]
# name: (write_video kwargs, frames in the file)
FILES = {
    "h264.mp4": dict(num_frames=40, fps=24, width=96, height=64),
    "odd_444.mp4": dict(num_frames=20, fps=25, width=75, height=41, pix_fmt="yuv444p"),
    "tall.mp4": dict(num_frames=12, fps=10, width=32, height=180),
    "mpeg4.mp4": dict(num_frames=20, fps=15, codec="mpeg4"),
    "vp9.webm": dict(num_frames=20, fps=15, codec="libvpx-vp9", container_format="webm"),
    "vfr.mp4": dict(num_frames=10, times_ms=VFR_TIMES_MS),
    "rot90.mp4": dict(num_frames=8, fps=10, width=64, height=32, rotation=90),
    "rot180.mp4": dict(num_frames=8, fps=10, width=64, height=32, rotation=180),
    "rot270.mp4": dict(num_frames=8, fps=10, width=64, height=32, rotation=270),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {name: write_video(root / name, **kw) for name, kw in FILES.items()}


def test_uniform_sampling_indices():
    cfr = np.arange(100) / 25.0
    idx, mask = sample_frame_indices(cfr, 8)
    assert idx.tolist() == [6, 18, 31, 43, 56, 68, 81, 93] and mask.all()  # ⌊(2i+1)·100/16⌋
    idx, _ = sample_frame_indices(np.arange(64) / 30.0, 32)
    assert idx.tolist() == list(range(1, 64, 2))  # exactly on frame starts: integer rule, no float ties
    idx, mask = sample_frame_indices(np.arange(10) / 30.0, 16)  # shorter than N: every frame, repeats masked
    assert sorted(set(idx.tolist())) == list(range(10)) and int(mask.sum()) == 10
    assert all(idx[k] == idx[k - 1] for k in range(1, 16) if not mask[k])
    idx, mask = sample_frame_indices(np.array(VFR_TIMES_MS) / 1000.0, 8)  # by time, not by index
    assert idx.tolist() == [2, 3, 5, 5, 6, 8, 8, 9]
    assert mask.tolist() == [True, True, True, False, True, True, False, True]
    assert sample_frame_indices([0.0], 3)[0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(cfr, 0)


@pytest.mark.skipif(not decord_available(), reason="decord has no wheel for this platform")
@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("num_frames", [8, 64])
def test_decord_and_pyav_give_the_same_frames(videos, name, num_frames):
    a = read_frames(videos[name], num_frames, backend="decord")
    b = read_frames(videos[name], num_frames, backend="pyav")
    assert (a.reader, b.reader) == ("decord", "pyav")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.mask, b.mask)
    assert torch.allclose(a.timestamps, b.timestamps, atol=1e-3)  # decord's are float32
    assert a.frames.shape == b.frames.shape == (num_frames, *b.frames.shape[1:])
    diff = (a.frames.int() - b.frames.int()).abs().max().item()
    assert diff <= PARITY_TOLERANCE, f"{name}: decord and PyAV differ by {diff} levels"
    assert a.rotation == b.rotation and a.num_video_frames == b.num_video_frames == FILES[name]["num_frames"]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_the_sampled_frames_are_the_named_ones(videos, backend):
    v = read_frames(videos["h264.mp4"], 8, backend=backend)
    assert v.indices.tolist() == [(2 * i + 1) * 40 // 16 for i in range(8)]
    assert torch.allclose(v.timestamps, v.indices.double() / 24, atol=1e-6)
    assert [frame_number(f.numpy(), 96, 64, 40) for f in v.frames] == v.indices.tolist()
    assert v.frames.dtype == torch.uint8 and v.frames.shape == (8, 64, 96, 3)
    assert v.duration == pytest.approx(40 / 24) and v.mask.all()
    again = read_frames(videos["h264.mp4"], 8, backend=backend)  # a fresh reader each call (decord #197)
    assert torch.equal(again.frames, v.frames)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_short_video_repeats_frames_and_masks_them(videos, backend):
    v = read_frames(videos["tall.mp4"], 32, backend=backend)  # 12 frames in the file
    assert v.frames.shape == (32, 180, 32, 3) and int(v.mask.sum()) == 12
    assert sorted(set(v.indices.tolist())) == list(range(12))
    for k in range(1, 32):
        if not v.mask[k]:  # a repeat is the frame before it, and only repeats are masked
            assert v.indices[k] == v.indices[k - 1] and torch.equal(v.frames[k], v.frames[k - 1])
        else:
            assert v.indices[k] > v.indices[k - 1]


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_variable_frame_rate_is_sampled_by_time(videos, backend):
    v = read_frames(videos["vfr.mp4"], 8, backend=backend)
    assert v.indices.tolist() == [2, 3, 5, 5, 6, 8, 8, 9]
    assert v.timestamps.tolist() == pytest.approx(
        [VFR_TIMES_MS[i] / 1000 for i in v.indices.tolist()], abs=1e-3
    )
    assert [frame_number(f.numpy(), 64, 48, 10) for f in v.frames] == v.indices.tolist()


@pytest.mark.parametrize("backend", ["auto", "pyav"])
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotation_metadata_is_applied(videos, backend, degrees):
    v = read_frames(videos[f"rot{degrees}.mp4"], 4, backend=backend)
    assert v.rotation == degrees
    for frame, k in zip(v.frames, v.indices.tolist()):  # counter-clockwise, as FFmpeg's autorotate
        turns = degrees // 90
        expected, opposite = (np.rot90(moving_squares(k, 64, 32), t) for t in (turns, turns + 2))
        assert frame.shape == expected.shape
        error = np.abs(frame.numpy().astype(int) - expected).mean()  # H.264 at 64×32: a few levels
        assert error < 8 and error < np.abs(frame.numpy().astype(int) - opposite).mean() / 4


def test_odd_sizes_and_other_codecs(videos):
    assert read_frames(videos["odd_444.mp4"], 5).frames.shape == (5, 41, 75, 3)
    for name in ("mpeg4.mp4", "vp9.webm"):
        v = read_frames(videos[name], 6)
        assert [frame_number(f.numpy(), 64, 48, 20) for f in v.frames] == v.indices.tolist()


def test_every_failure_names_the_file_and_the_reason(videos, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    still = tmp_path / "still.png"
    Image.new("RGB", (16, 16), (255, 0, 0)).save(still)
    cut = truncate(videos["h264.mp4"], tmp_path / "cut.mp4", 0.5)  # the index (moov) was at the end
    fast = write_video(tmp_path / "fast.mp4", 30, fps=30, faststart=True)
    cut_fast = truncate(fast, tmp_path / "cut_fast.mp4", 0.6)  # index kept, 2/3 of the frames gone
    cases = {
        tmp_path / "missing.mp4": "missing",
        empty: "empty",
        tmp_path: "not_a_video",
        text: "not_a_video",
        still: "not_a_video",
        cut: "corrupt",
        cut_fast: "truncated",
        write_audio_only(tmp_path / "speech.m4a"): "audio_only",
    }
    for backend in ("auto", "pyav"):
        for path, reason in cases.items():
            with pytest.raises(VideoReadError) as info:
                read_frames(path, 4, backend=backend)
            assert info.value.reason == reason and info.value.path == str(path)
            assert str(info.value).startswith(f"{path}: ") and f"({reason})" in str(info.value)
    # in a dataset: each bad file is skipped and counted by its reason, never a crash
    skips, read = SkipCounter(), []
    for path in [videos["h264.mp4"], *cases, videos["tall.mp4"]]:
        try:
            read.append(read_frames(path, 4))
        except VideoReadError as e:
            skips.add(e.reason, e.path, str(e))
    assert len(read) == 2 and skips.total == len(cases)
    assert skips.counts == {
        "missing": 1,
        "empty": 1,
        "not_a_video": 3,
        "corrupt": 1,
        "truncated": 1,
        "audio_only": 1,
    }
    with pytest.raises(ValueError, match="num_frames"):
        read_frames(videos["h264.mp4"], 0)


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_bytes_in_memory_read_as_the_file_does(videos, tmp_path, backend):
    """A video inside a tar shard is read from its bytes: the same frames, errors name the given name."""
    for name in ("h264.mp4", "vfr.mp4", "rot90.mp4", "vp9.webm"):
        a = read_frames(videos[name], 8, backend=backend)
        b = read_frames(videos[name].read_bytes(), 8, backend=backend, name=f"shard.tar#{name}")
        assert torch.equal(a.frames, b.frames) and torch.equal(a.indices, b.indices)
        assert b.path == f"shard.tar#{name}" and (a.reader, a.rotation) == (b.reader, b.rotation)
    data = videos["h264.mp4"].read_bytes()
    cases = {
        b"": "empty",
        b"not a video\n" * 20: "not_a_video",
        data[: len(data) // 2]: "corrupt",
        write_audio_only(tmp_path / "a.m4a").read_bytes(): "audio_only",
    }
    for blob, reason in cases.items():
        with pytest.raises(VideoReadError) as info:
            read_frames(blob, 4, backend=backend, name="s.tar#k")
        assert info.value.reason == reason and str(info.value).startswith("s.tar#k: ")


def test_pyav_alone_when_decord_is_absent_or_fails(videos, monkeypatch):
    ref = read_frames(videos["h264.mp4"], 8, backend="pyav")
    monkeypatch.setattr(video_mod, "_decord", lambda: None)  # as on aarch64 / macOS: no decord wheel
    v = read_frames(videos["h264.mp4"], 8)
    assert v.reader == "pyav" and torch.equal(v.frames, ref.frames)
    with pytest.raises(ImportError, match="decord is not installed"):
        read_frames(videos["h264.mp4"], 8, backend="decord")

    class Broken:  # decord that fails on this file: PyAV reads it instead
        @staticmethod
        def cpu(_):
            return None

        @staticmethod
        def VideoReader(*_, **__):
            raise RuntimeError("decord cannot open this stream")

    monkeypatch.setattr(video_mod, "_decord", lambda: Broken)
    v = read_frames(videos["h264.mp4"], 8)
    assert v.reader == "pyav" and torch.equal(v.frames, ref.frames)
    with pytest.raises(VideoReadError, match="decord cannot read it"):
        read_frames(videos["h264.mp4"], 8, backend="decord")


def test_frames_through_the_image_transform(videos):
    transform = ImageTransform(tile_size=56, max_tiles=2)
    tall = read_frames(videos["tall.mp4"], 16)  # 12 frames: 4 repeats
    wide = read_frames(videos["h264.mp4"], 8)
    a, b = video_tiles(tall, transform), video_tiles(wide, transform)
    assert a["pixel_values"].shape == (16, 2, 3, 56, 56) and b["pixel_values"].shape == (8, 2, 3, 56, 56)
    for video, tiles in ((tall, a), (wide, b)):
        for k in (0, len(video.frames) - 1):  # each frame exactly as the image path tiles it
            ref = transform(Image.fromarray(video.frames[k].numpy()))
            assert torch.equal(tiles["pixel_values"][k], ref.pixel_values)
            assert tiles["aspect_ratio_ids"][k] == ref.aspect_ratio_id
            assert torch.equal(tiles["aspect_ratio_mask"][k], ref.aspect_ratio_mask)
    assert torch.equal(a["frame_mask"], tall.mask)
    batch = collate_videos([a, b], num_frames=16)
    assert batch["video_pixel_values"].shape == (2, 16, 2, 3, 56, 56)
    assert batch["video_frame_mask"].tolist() == [tall.mask.tolist(), [True] * 8 + [False] * 8]
    assert torch.equal(batch["video_pixel_values"][1, :8], b["pixel_values"])
    assert (
        batch["video_pixel_values"][1, 8:].abs().sum() == 0
        and (batch["video_aspect_ratio_ids"][1, 8:] == 0).all()
    )
    assert (batch["video_aspect_ratio_mask"][1, 8:, 0] == 1).all()
    with pytest.raises(ValueError, match="more than num_frames=8"):
        collate_videos([a], num_frames=8)
