"""eSpeak NG through ctypes (pip only): real speech of plausible length and pitch, bit-identical for the same
arguments, different voices sound different; the spoken dataset holds voices out of the train split."""

import json

import numpy as np
import pytest
import soundfile as sf

from herd.data.synthetic.speech import (
    HELD_OUT_VOICES,
    SAMPLE_RATE,
    TRAIN_VOICES,
    VOCABULARY,
    ESpeak,
    ESpeakError,
    random_sentences,
    synthesize,
    write_speech_dataset,
)
from herd.data.training.audio import AudioDataset
from herd.speech.audio import read_audio


def median_f0(wave: np.ndarray, sr: int = SAMPLE_RATE) -> tuple[float, int]:
    """(median fundamental frequency in Hz over voiced 40 ms frames, how many frames were voiced), by the
    autocorrelation peak between 60 and 400 Hz; a frame is voiced when it is loud and periodic."""
    x = wave.astype(np.float64) / 32768
    size, estimates = int(0.04 * sr), []
    for start in range(0, len(x) - size, size // 2):
        seg = x[start : start + size]
        if np.sqrt((seg**2).mean()) < 0.05:
            continue
        seg = seg - seg.mean()
        ac = np.correlate(seg, seg, "full")[size - 1 :]  # lags 0..size-1
        lo, hi = sr // 400, sr // 60
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:
            estimates.append(sr / lag)
    return float(np.median(estimates)) if estimates else 0.0, len(estimates)


def test_synthesis_is_speech_of_plausible_length_loudness_and_pitch():
    wave = synthesize("red cat jumps", "en-us", rate=175, pitch=50)
    seconds = len(wave) / SAMPLE_RATE
    print(
        f"'red cat jumps' en-us @175 wpm: {seconds:.2f} s, rms {np.sqrt((wave.astype(float) ** 2).mean()):.0f}"
    )
    assert wave.dtype == np.int16 and 0.6 < seconds < 1.8  # 3 words at ~3 words/s, with onset and tail
    frames = wave[: len(wave) // 441 * 441].reshape(-1, 441).astype(np.float64)  # 20 ms frames
    loud = np.sqrt((frames**2).mean(1)) > 1000  # about −30 dBFS
    assert 0.4 < loud.mean() < 0.95  # mostly sound, with pauses
    f0, voiced = median_f0(wave)
    assert voiced >= 10 and 80 < f0 < 180, (f0, voiced)  # a male voice's pitch range
    # the rate is words per minute: 100 wpm takes about 2.5× as long as 250 wpm
    slow, fast = (len(synthesize("red cat jumps", "en-us", rate=r)) for r in (100, 250))
    assert 1.8 < slow / fast < 3.0, (slow, fast)
    # the pitch parameter moves the fundamental: measured 77 Hz at 20, 137 Hz at 80
    low, high = (median_f0(synthesize("red cat jumps", "en-us", pitch=p))[0] for p in (20, 80))
    assert high > 1.4 * low, (low, high)


def test_same_arguments_give_the_same_samples_whatever_came_before():
    first = synthesize("blue fish sing", "en-us+m3", rate=140, pitch=35)
    synthesize("seven happy tigers", "en-gb-x-rp+f4", rate=200, pitch=65)  # would leave state behind
    assert np.array_equal(synthesize("blue fish sing", "en-us+m3", rate=140, pitch=35), first)
    # the library does carry state from one utterance to the next: why `synthesize` reloads it
    with ESpeak() as engine:
        a = engine.synthesize("blue fish sing", "en-us+m3", 140, 35)
        b = engine.synthesize("blue fish sing", "en-us+m3", 140, 35)
    assert np.array_equal(a, first) and not np.array_equal(a, b)


def test_voice_variants_differ_and_bad_voices_are_errors():
    male, female = (synthesize("red cat jumps", v) for v in ("en-us+m3", "en-us+f3"))
    assert not np.array_equal(male[: min(len(male), len(female))], female[: min(len(male), len(female))])
    f0_male, f0_female = median_f0(male)[0], median_f0(female)[0]
    print(f"median F0: en-us+m3 {f0_male:.0f} Hz, en-us+f3 {f0_female:.0f} Hz")  # measured 103 and 207
    assert f0_female > 1.5 * f0_male
    with pytest.raises(ESpeakError, match="no voice 'xx-nowhere'"):
        synthesize("red", "xx-nowhere")
    with pytest.raises(ValueError, match="empty text"):
        synthesize("  ")


def test_the_spoken_dataset_holds_voices_out_and_reads_back(tmp_path):
    assert len(VOCABULARY) >= 30 and len(set(VOCABULARY)) == len(VOCABULARY)
    assert not set(TRAIN_VOICES) & set(HELD_OUT_VOICES)
    sentences = random_sentences(500, np.random.default_rng(0))
    assert {len(s.split()) for s in sentences} == {2, 3, 4, 5}
    paths = write_speech_dataset(tmp_path, n_train=8, n_test=4, seed=3)
    records = {split: [json.loads(line) for line in paths[split].read_text().splitlines()] for split in paths}
    assert len(records["train"]) == 8 and len(records["test"]) == 4
    assert {r["voice"] for r in records["train"]} <= set(TRAIN_VOICES)
    assert {r["voice"] for r in records["test"]} <= set(HELD_OUT_VOICES)
    for r in records["train"] + records["test"]:
        assert set(r["text"].split()) <= set(VOCABULARY) and 2 <= len(r["text"].split()) <= 5
        assert sf.info(str(tmp_path / r["audio"])).samplerate == 16000  # resampled once, when written
        wave = read_audio(tmp_path / r["audio"])  # 16 kHz float, through the dataset's own reader
        assert abs(wave.numel() / 16000 - r["duration"]) < 0.01 and wave.abs().max() > 0.1
    # the same seed writes the same dataset, samples included
    again = write_speech_dataset(tmp_path / "again", n_train=8, n_test=4, seed=3)
    assert again["train"].read_text() == paths["train"].read_text()
    assert (tmp_path / "clips/test_000003.wav").read_bytes() == (
        tmp_path / "again/clips/test_000003.wav"
    ).read_bytes()
    data = AudioDataset.from_jsonl(paths["test"], loop=False, shuffle=False)
    assert [s["text"] for s in data] == [r["text"] for r in records["test"]] and not data.skipped.counts
    with pytest.raises(ValueError, match="held-out voices"):
        write_speech_dataset(tmp_path / "bad", 1, 1, train_voices=("en-us",), test_voices=("en-us",))
