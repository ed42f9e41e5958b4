"""Reading audio: soundfile formats, the PyAV fallback, mono at 16 kHz, errors that name the file and reason."""

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from speech_inputs import stereo_tone, write_aac, write_bad_audio_files
from torchaudio.transforms import Resample

from herd.speech.audio import AudioError, read_audio, read_audio_bytes, to_mono_16k


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_soundfile_formats_become_the_mono_16k_mean_of_the_channels(tmp_path, ext):
    samples = stereo_tone(1.0, 44100)
    path = tmp_path / f"tone.{ext}"
    sf.write(str(path), samples, 44100)
    wave = read_audio(path)
    decoded, rate = sf.read(str(path), dtype="float32", always_2d=True)  # what the file holds after coding
    expected = Resample(44100, 16000)(torch.from_numpy(decoded).mean(1))
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    torch.testing.assert_close(wave, expected, atol=1e-6, rtol=0)
    # the functional form builds the same kernel each call; float rounding differs by ~1e-5
    torch.testing.assert_close(
        wave, AF.resample(torch.from_numpy(decoded).mean(1), 44100, 16000), atol=1e-4, rtol=0
    )
    if ext != "ogg":  # lossless: the mean of the channels as written
        lossless = AF.resample(torch.from_numpy(samples).mean(1), 44100, 16000)
        assert (wave - lossless).abs().max() < 1e-3  # 16-bit PCM / FLAC quantisation


def test_a_file_soundfile_cannot_read_goes_through_pyav(tmp_path):
    samples = stereo_tone(1.0, 44100)
    path = write_aac(tmp_path / "tone.m4a", samples, 44100)
    with pytest.raises(RuntimeError):
        sf.info(str(path))  # libsndfile has no AAC
    wave = read_audio(path)
    reference = AF.resample(torch.from_numpy(samples).mean(1), 44100, 16000)
    # AAC adds an encoder delay (priming samples) and is lossy: align, then compare the waveforms
    assert 16000 <= wave.numel() <= 16000 + 2048 * 16000 // 44100 + 64
    scores = np.correlate(
        wave[: 12000 + 1199].numpy(), reference[:12000].numpy(), mode="valid"
    )  # lags 0..1199
    best = int(scores.argmax())
    corr = np.corrcoef(wave[best : best + 12000].numpy(), reference[:12000].numpy())[0, 1]
    assert corr > 0.99, corr


def test_mono_and_resampling_helper():
    x = np.stack([np.ones(800), -np.ones(800) * 0.5], 1).astype(np.float32)
    assert torch.allclose(to_mono_16k(x, 16000), torch.full((800,), 0.25))
    assert to_mono_16k(np.ones(8000, np.float32), 8000).shape == (16000,)


def test_errors_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 50)
    (tmp_path / "empty.flac").write_bytes(b"")
    sf.write(str(tmp_path / "zero.wav"), np.zeros((0, 1), np.float32), 16000)
    sf.write(str(tmp_path / "long.wav"), np.zeros(32000, np.float32), 16000)
    write_aac(tmp_path / "long.m4a", stereo_tone(2.0, 16000), 16000)
    (tmp_path / "folder.wav").mkdir()
    nan = np.zeros(1600, np.float32)
    nan[5] = np.nan
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    cases = {
        "missing.wav": ("missing_file", "not found"),
        "garbage.wav": ("not_audio", "neither soundfile nor PyAV"),
        "empty.flac": ("empty_file", "0 bytes"),
        "zero.wav": ("empty_audio", "no audio samples"),
        "long.wav": ("too_long", "exceeds the 1 s limit"),  # from the header, before decoding
        "long.m4a": ("too_long", "more than 1 s"),  # while decoding with PyAV
        "folder.wav": ("not_audio", "not a file"),
        "nan.wav": ("bad_samples", "NaN"),
    }
    for name, (reason, words) in cases.items():
        with pytest.raises(AudioError) as err:
            read_audio(tmp_path / name, max_seconds=1.0)
        assert err.value.reason == reason, name
        assert str(err.value).startswith(str(tmp_path / name) + ":") and words in str(err.value), str(
            err.value
        )
        assert isinstance(err.value, ValueError)


def test_bytes_decode_as_the_file_and_errors_name_them(tmp_path):
    sf.write(str(tmp_path / "tone.flac"), stereo_tone(0.5, 44100), 44100)
    write_aac(tmp_path / "tone.m4a", stereo_tone(0.5, 44100), 44100)  # through PyAV
    for name in ("tone.flac", "tone.m4a"):
        wave = read_audio_bytes((tmp_path / name).read_bytes(), f"s.tar#{name}")
        assert torch.equal(wave, read_audio(tmp_path / name)), name
    bad = write_bad_audio_files(tmp_path / "bad")  # {"bad/garbage.wav": "not_audio", ...}
    write_aac(tmp_path / "bad" / "long.m4a", stereo_tone(3.0, 16000), 16000)
    nan = np.zeros(1600, np.float32)
    nan[5] = np.inf
    sf.write(str(tmp_path / "bad" / "nan.wav"), nan, 16000, subtype="FLOAT")
    bad |= {"bad/long.m4a": "too_long", "bad/nan.wav": "bad_samples"}
    for rel, reason in bad.items():
        if reason in ("missing_file", "too_short"):  # no bytes to read; too short is the dataset's limit
            continue
        data = (tmp_path / rel).read_bytes()
        with pytest.raises(AudioError) as err:
            read_audio_bytes(data, f"shard.tar#{rel}", max_seconds=2.0)
        assert err.value.reason == reason, rel
        assert str(err.value).startswith(f"shard.tar#{rel}: ") and "BytesIO" not in str(err.value), str(
            err.value
        )
        with pytest.raises(AudioError) as from_file:
            read_audio(tmp_path / rel, max_seconds=2.0)
        assert (
            str(err.value).removeprefix(f"shard.tar#{rel}")
            == str(from_file.value).removeprefix(str(tmp_path / rel))
            or reason == "not_audio"
        )  # the decoders' own wording of the cause differs
