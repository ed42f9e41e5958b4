"""Audio files the speech tests write themselves (numpy sines and noise through soundfile and PyAV): nothing
is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def stereo_tone(seconds: float, rate: int) -> np.ndarray:
    """(N, 2) float32: 440 Hz left, 220 Hz at half level right."""
    t = np.arange(int(seconds * rate)) / rate
    return (np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 220 * t)], 1) * 0.5).astype(
        np.float32
    )


def write_aac(path: Path, samples: np.ndarray, rate: int) -> Path:
    """An AAC-in-MP4 file (which libsndfile cannot read) through PyAV's bundled FFmpeg."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_bad_audio_files(folder: Path) -> dict[str, str]:
    """One file per way an audio file can be unusable → {relative path: the reason it is skipped under}."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "garbage.wav").write_bytes(b"RIFF? not really" * 64)
    (folder / "empty.wav").write_bytes(b"")
    sf.write(str(folder / "silence0.wav"), np.zeros((0, 1), np.float32), 16000)  # a header, no samples
    sf.write(str(folder / "long.wav"), np.zeros(16000 * 3, np.float32), 16000)  # 3 s
    sf.write(str(folder / "blip.wav"), np.zeros(100, np.float32), 16000)  # under one 25 ms frame
    return {
        "bad/garbage.wav": "not_audio",
        "bad/empty.wav": "empty_file",
        "bad/silence0.wav": "empty_audio",
        "bad/long.wav": "too_long",
        "bad/blip.wav": "too_short",
        "bad/nowhere.wav": "missing_file",
    }
