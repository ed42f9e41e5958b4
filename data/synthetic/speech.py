"""Real synthesised speech for tests and the speech quickstart: eSpeak NG through ctypes, installed by pip.

    wave = synthesize("red cat jumps", voice="en-us+m3", rate=175, pitch=50)   # (N,) int16 at 22,050 Hz
    paths = write_speech_dataset("runs/speech_data", n_train=400, n_test=100)  # wavs + train/test jsonl

The `espeakng-loader` wheel ships `libespeak-ng.so` and its voice data (`espeak-ng-data`), so nothing
comes from the system: the library is loaded with ctypes and driven through its C API (speak_lib.h) —
`espeak_Initialize` in AUDIO_OUTPUT_SYNCHRONOUS mode (samples are handed to our callback inside
`espeak_Synth`, no audio device), `espeak_SetSynthCallback`, `espeak_SetVoiceByName` (a language voice,
optionally with a `+variant`: `en-us+f3`), `espeak_SetParameter` for the rate (words per minute) and the
pitch (0–100), `espeak_Synth`. Output is 16-bit mono at the library's rate, 22,050 Hz.

eSpeak NG keeps state in the library from one utterance to the next that neither the voice and parameter
calls nor `espeak_Terminate` + `espeak_Initialize` reset (measured: "red cat" by en-us+m3 came out 16,503
samples long after an en-us utterance, 16,495 from a fresh library, and the samples differed). So
`synthesize` gives every utterance a freshly loaded copy of the library — dlopen, Initialize, Synth,
Terminate, dlclose, about 15 ms — and a result depends on its own arguments only
(tests/speech/test_espeak.py checks it is bit-identical). Calls are serialised by a lock: the library's
state is process-wide.

The dataset: utterances of 2–5 words drawn from a vocabulary (`VOCABULARY`, 40 words), each spoken by a
voice variant at a rate and a pitch drawn from small sets. The test split uses voice variants the train
split never hears (`HELD_OUT_VOICES`), so a model's accuracy on it measures generalisation to new voices.
"""

from __future__ import annotations

import _ctypes
import ctypes
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 22_050  # what espeak_Initialize returns for the bundled data (checked at start-up)

# speak_lib.h constants
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
POS_CHARACTER = 1
CHARS_UTF8 = 1
PARAM_RATE, PARAM_PITCH = 1, 3
EE_OK = 0

VOCABULARY: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple",
    "one", "two", "three", "four", "five", "six", "seven", "eight",
    "cat", "dog", "bird", "fish", "horse", "mouse", "lion", "tiger",
    "run", "jump", "sing", "sleep", "read", "write", "swim", "fly",
    "big", "small", "happy", "quiet", "fast", "slow", "warm", "cold",
)  # fmt: skip
# Voice variants (espeak-ng-data/voices/!v) on three English accents; the held-out ones are never in train.
TRAIN_VOICES: tuple[str, ...] = (
    "en-us+m1", "en-us+m3", "en-us+f1", "en-us+f3", "en+m2", "en+f2", "en-gb-x-rp+m4", "en-gb-x-rp+f4",
)  # fmt: skip
HELD_OUT_VOICES: tuple[str, ...] = ("en-us+m7", "en+f5", "en-gb-x-rp+m6")
RATES: tuple[int, ...] = (140, 170, 200)  # words per minute (eSpeak's default: 175)
PITCHES: tuple[int, ...] = (35, 50, 65)  # 0–100 (default 50)

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class ESpeakError(RuntimeError):
    pass


def library_paths() -> tuple[str, str]:
    """(libespeak-ng, espeak-ng-data) as shipped in the espeakng-loader wheel."""
    try:
        import espeakng_loader
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("speech synthesis needs espeakng-loader: pip install 'herd[speech]'") from e
    return espeakng_loader.get_library_path(), espeakng_loader.get_data_path()


class ESpeak:
    """One loaded, initialised copy of libespeak-ng; `close()` (or leaving a `with` block) unloads it.

    Use `synthesize()` unless you want the library's carried-over state (module docstring)."""

    def __init__(self, library: str | None = None, data: str | None = None) -> None:
        if library is None or data is None:
            default_library, default_data = library_paths()
            library, data = library or default_library, data or default_data
        self.lib = lib = ctypes.CDLL(library)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]  # fmt: skip
        rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), INITIALIZE_DONT_EXIT)
        if rate <= 0:
            self.close()
            raise ESpeakError(f"espeak_Initialize failed (returned {rate}) with data at {data}")
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept on self: the C library holds only a raw pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, n: int, events: Any) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0: continue synthesis

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """`text` spoken by `voice` at `rate` words per minute and `pitch` (0–100): (N,) int16 samples."""
        if not text.strip():
            raise ValueError("nothing to synthesise: empty text")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ESpeakError(f"eSpeak NG has no voice {voice!r} (names like 'en-us', 'en-us+f3')")
        # after the voice: selecting a voice resets rate and pitch to its own defaults
        for param, value in ((PARAM_RATE, rate), (PARAM_PITCH, pitch)):
            if self.lib.espeak_SetParameter(param, int(value), 0) != EE_OK:
                raise ESpeakError(f"eSpeak NG refused parameter {param} = {value}")
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        err = self.lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        chunks, self._chunks = self._chunks, []
        if err != EE_OK:
            raise ESpeakError(f"espeak_Synth failed with error {err} on {text!r}")
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def close(self) -> None:
        """Terminate and unload: the next `ESpeak` starts from the library's initial state."""
        if self.lib is None:
            return
        self.lib.espeak_Terminate()
        unload = getattr(_ctypes, "dlclose", None) or _ctypes.FreeLibrary  # POSIX / Windows
        unload(self.lib._handle)
        self.lib = None  # type: ignore[assignment]

    def __enter__(self) -> ESpeak:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LOCK = threading.Lock()


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """(N,) int16 at `SAMPLE_RATE`: `text` spoken by `voice` at `rate` words per minute and `pitch` (0–100),
    by a freshly loaded library, so the same arguments always give the same samples."""
    with _LOCK, ESpeak() as engine:
        if engine.sample_rate != SAMPLE_RATE:
            raise ESpeakError(f"eSpeak NG runs at {engine.sample_rate} Hz, expected {SAMPLE_RATE}")
        return engine.synthesize(text, voice, rate, pitch)


def random_sentences(
    n: int,
    rng: np.random.Generator,
    words: Sequence[str] = VOCABULARY,
    min_words: int = 2,
    max_words: int = 5,
) -> list[str]:
    """`n` utterances of `min_words`..`max_words` words drawn uniformly (with repeats) from `words`."""
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 ≤ min_words ≤ max_words, got {min_words}, {max_words}")
    lengths = rng.integers(min_words, max_words + 1, size=n)
    return [" ".join(words[int(i)] for i in rng.integers(len(words), size=int(k))) for k in lengths]


def write_split(
    out_dir: Path,
    split: str,
    n: int,
    voices: Sequence[str],
    rng: np.random.Generator,
    words: Sequence[str] = VOCABULARY,
    rates: Sequence[int] = RATES,
    pitches: Sequence[int] = PITCHES,
    sample_rate: int | None = 16_000,
    sentences: Callable[[int, np.random.Generator], list[str]] | None = None,
) -> Path:
    """Write `n` utterances of one split as `clips/<split>_<i>.wav` and `<split>.jsonl`; returns the manifest.

    Files are 16-bit PCM at `sample_rate`: by default the encoder's 16 kHz, resampled once here so that a
    training run reads them without resampling (22,050 → 16,000 Hz costs ~70 ms per clip, as much as a
    tiny encoder's step); None keeps eSpeak's 22,050 Hz.
    Records: {"audio": path relative to out_dir, "text", "voice", "rate", "pitch", "duration" (s)}."""
    import soundfile as sf

    from herd.data.records import write_jsonl
    from herd.speech.audio import to_mono_16k

    rate_out = sample_rate or SAMPLE_RATE

    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    texts = sentences(n, rng) if sentences is not None else random_sentences(n, rng, words)
    for i, text in enumerate(texts):
        voice = voices[int(rng.integers(len(voices)))]
        rate, pitch = int(rng.choice(rates)), int(rng.choice(pitches))
        wave = synthesize(text, voice, rate, pitch).astype(np.float32) / 32768.0  # (N,) in [-1, 1)
        if rate_out != SAMPLE_RATE:
            wave = to_mono_16k(wave, SAMPLE_RATE, rate_out).numpy()
        rel = f"clips/{split}_{i:06d}.wav"
        sf.write(str(out_dir / rel), np.clip(wave, -1.0, 1.0), rate_out, subtype="PCM_16")
        records.append({"audio": rel, "text": text, "voice": voice, "rate": rate, "pitch": pitch,
                        "duration": round(len(wave) / rate_out, 4)})  # fmt: skip
    manifest = out_dir / f"{split}.jsonl"
    write_jsonl(manifest, records)
    return manifest


def write_speech_dataset(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int = 0,
    words: Sequence[str] = VOCABULARY,
    train_voices: Sequence[str] = TRAIN_VOICES,
    test_voices: Sequence[str] = HELD_OUT_VOICES,
    sample_rate: int | None = 16_000,
    sentences: Callable[[int, np.random.Generator], list[str]] | None = None,
) -> dict[str, Path]:
    """A spoken dataset: `n_train` utterances by `train_voices`, `n_test` by the held-out `test_voices`
    (disjoint), texts, voices, rates and pitches drawn from `seed`; `sentences(n, rng)` replaces the uniform
    draw of words (`random_sentences`) by another text generator. Returns {"train": manifest, "test": …}."""
    shared = sorted(set(train_voices) & set(test_voices))
    if shared:
        raise ValueError(f"held-out voices must not be in the train voices: {shared}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    return {"train": write_split(out, "train", n_train, train_voices, rng, words, sample_rate=sample_rate,
                                 sentences=sentences),
            "test": write_split(out, "test", n_test, test_voices, rng, words, sample_rate=sample_rate,
                                sentences=sentences)}  # fmt: skip


__all__ = [
    "HELD_OUT_VOICES",
    "SAMPLE_RATE",
    "TRAIN_VOICES",
    "VOCABULARY",
    "ESpeak",
    "ESpeakError",
    "library_paths",
    "random_sentences",
    "synthesize",
    "write_speech_dataset",
    "write_split",
]
