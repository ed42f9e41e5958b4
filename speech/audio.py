"""Reading audio files: mono float32 at 16 kHz, with errors that name the file and the problem.

    wave = read_audio("clip.flac")              # (N,) float32 tensor, 16 kHz, mono
    wave = read_audio("talk.mp3", max_seconds=60)
    wave = read_audio_bytes(data, "shard-000000.tar#utt42")  # bytes in memory (a tar member)

Decoders: soundfile (libsndfile ships inside its wheel: WAV, FLAC, OGG/Vorbis, Opus, MP3, AIFF, ...) first;
PyAV (FFmpeg's libraries ship inside its wheel: m4a/AAC, webm, video containers, ...) for what soundfile
cannot read. torchaudio's own `load` is not used: from 2.9 on it needs torchcodec and a system FFmpeg.
Channels are averaged to mono; the rate is converted with `torchaudio.transforms.Resample` (windowed
sinc, its defaults) whichever decoder read the file.

Every failure is an `AudioError` (a ValueError) whose message starts with the path (for bytes: the `name`
given, e.g. the shard and the sample) and whose `reason` is the skip reason a dataset counts it under:
`missing_file`, `empty_file` (0 bytes), `not_audio` (no decoder could read it), `empty_audio` (decoded,
but no samples), `too_long` (over `max_seconds`), `bad_samples` (NaN or infinite values).

This is the I/O of `herd.speech`; the encoder modules (`features`, `conformer`, `bestrq`) read nothing.
"""

from __future__ import annotations

import functools
import io
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from herd.speech.features import SAMPLE_RATE


class AudioError(ValueError):
    """An audio file that cannot be used; `reason` names why (a dataset's skip reason)."""

    def __init__(self, path: str | PathLike, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason = str(path), reason


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading audio needs soundfile: pip install 'herd[speech]'") from e
    return soundfile


# What a reader decodes: a file, or the bytes of one held in memory (a tar shard's member).
Source = Path | bytes


class _Member(io.BytesIO):
    """Bytes as a file object whose repr is their name, so decoder messages quoting it read as a path."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name)


def _open(source: Source, name: str | PathLike) -> str | io.BytesIO:
    """What soundfile and PyAV open: the path, or a fresh file object over the bytes (each open reads
    from the start)."""
    return str(source) if isinstance(source, Path) else _Member(source, str(name))


def _read_soundfile(
    source: Source, name: str | PathLike, max_seconds: float | None
) -> tuple[np.ndarray, int] | None:
    """(samples (N, C) float32, rate), or None when libsndfile cannot open the file; `name` in errors."""
    sf = _soundfile()
    try:
        info = sf.info(_open(source, name))
    except (RuntimeError, TypeError):  # not a format libsndfile knows (LibsndfileError is a RuntimeError)
        return None
    if max_seconds is not None and info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        # from the header: a three-hour file is refused before it is decoded
        raise AudioError(
            name,
            "too_long",
            f"{info.frames / info.samplerate:.1f} s of audio exceeds the {max_seconds:g} s limit",
        )
    try:
        data, rate = sf.read(_open(source, name), dtype="float32", always_2d=True)
    except RuntimeError as e:
        raise AudioError(name, "not_audio", f"could not decode ({type(e).__name__}: {e})") from e
    return data, int(rate)


def _read_pyav(source: Source, name: str | PathLike, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(samples (N, C) float32, rate) decoded by FFmpeg through PyAV; `name` in errors."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise AudioError(
            name, "not_audio", "soundfile cannot read it and PyAV is missing (pip install av)"
        ) from e
    try:
        with av.open(_open(source, name)) as container:
            streams = container.streams.audio
            if not streams:
                raise AudioError(name, "not_audio", "no audio stream")
            stream = streams[0]
            rate = int(stream.rate or stream.codec_context.sample_rate or 0)
            # planar float at the stream's own rate and layout: the mono mix and resampling are ours, the
            # same as for soundfile's files (FFmpeg's downmix would weight channels its own way)
            resampler = av.AudioResampler(format="fltp", rate=rate or None)
            chunks, total = [], 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()  # (C, n)
                    chunks.append(chunk)
                    total += chunk.shape[1]
                if max_seconds is not None and rate and total / rate > max_seconds:
                    raise AudioError(name, "too_long", f"more than {max_seconds:g} s of audio")
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray())
    except AudioError:
        raise
    except (
        Exception
    ) as e:  # FFmpeg raises many types (InvalidDataError, ValueError, ...): all mean "can't read"
        raise AudioError(
            name, "not_audio", f"neither soundfile nor PyAV can decode it ({type(e).__name__}: {e})"
        ) from e
    if not chunks or rate <= 0:
        return np.zeros((0, 1), dtype=np.float32), rate or SAMPLE_RATE
    channels = max(c.shape[0] for c in chunks)
    data = np.concatenate([np.broadcast_to(c, (channels, c.shape[1])) for c in chunks], axis=1)
    return np.ascontiguousarray(data.T, dtype=np.float32), rate


def to_mono_16k(
    samples: np.ndarray | torch.Tensor, rate: int, target_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """(N, C) or (N,) samples at `rate` → (N',) float32 at `target_rate`: channels averaged, then resampled."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if x.dim() == 2:
        x = x.mean(dim=1)  # (N,)
    if rate != target_rate and x.numel():
        x = _resampler(rate, target_rate)(x)
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _resampler(rate: int, target_rate: int) -> torch.nn.Module:
    """torchaudio's `Resample` (windowed sinc, its defaults), built once per pair of rates: its kernel takes
    longer to build than to apply (measured 22,050 → 16,000 Hz on a 1.25 s clip: 221 ms per call of
    `functional.resample`, 69 ms with the kernel kept, on 2 busy cores)."""
    from torchaudio.transforms import Resample

    return Resample(rate, target_rate)


def read_audio(
    path: str | PathLike, max_seconds: float | None = None, target_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """The mono waveform of an audio file at `target_rate`, (N,) float32 (see the module docstring)."""
    file = Path(path)
    if not file.exists():
        raise AudioError(file, "missing_file", "audio file not found")
    if not file.is_file():
        raise AudioError(file, "not_audio", "not a file")
    if file.stat().st_size == 0:
        raise AudioError(file, "empty_file", "the file is empty (0 bytes)")
    return _decode(file, file, max_seconds, target_rate)


def read_audio_bytes(
    data: bytes, name: str, max_seconds: float | None = None, target_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """`read_audio` for the bytes of an audio file held in memory (a tar shard's member); `name`
    (e.g. "shard-000000.tar#utt42") starts the errors' messages in place of a path."""
    if len(data) == 0:
        raise AudioError(name, "empty_file", "the file is empty (0 bytes)")
    return _decode(bytes(data), name, max_seconds, target_rate)


def _decode(
    source: Source, name: str | PathLike, max_seconds: float | None, target_rate: int
) -> torch.Tensor:
    decoded = _read_soundfile(source, name, max_seconds)
    data, rate = decoded if decoded is not None else _read_pyav(source, name, max_seconds)
    if data.shape[0] == 0:
        raise AudioError(name, "empty_audio", "the file holds no audio samples")
    if max_seconds is not None and data.shape[0] / rate > max_seconds:
        raise AudioError(
            name, "too_long", f"{data.shape[0] / rate:.1f} s of audio exceeds the {max_seconds:g} s limit"
        )
    if not np.isfinite(data).all():
        raise AudioError(name, "bad_samples", "the audio holds NaN or infinite samples")
    return to_mono_16k(data, rate, target_rate)


__all__ = ["AudioError", "read_audio", "read_audio_bytes", "to_mono_16k"]
