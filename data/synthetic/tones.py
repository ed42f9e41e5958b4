"""Synthetic audio for speech tests and CPU runs: "utterances" of harmonic tones, written as WAV files.

An utterance is a run of segments of 80–240 ms, each a harmonic tone (a fundamental from a small set of
pitches, 3 harmonics with a fixed timbre) or a burst of noise, with short fades, over faint background
noise. It is not speech, but it has what masked prediction needs: frames inside a segment are
predictable from their neighbours, and segment boundaries are not, so a BEST-RQ loss can fall well below
chance and stay above zero.

`write_tone_manifest(out_dir, n)` writes `clips/*.wav` and `manifest.jsonl` (`{"audio": "clips/…",
"duration": seconds}`); utterance i is drawn from its own generator seeded by (seed, i), so the first
n clips do not depend on how many are written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from herd.data.records import write_jsonl

PITCHES_HZ = (110.0, 147.0, 196.0, 262.0, 349.0, 466.0)
HARMONIC_GAINS = (1.0, 0.5, 0.25)


def tone_utterance(rng: np.random.Generator, seconds: float, sample_rate: int = 16_000) -> np.ndarray:
    """(N,) float32 in [-1, 1]: segments of tones or noise (see the module docstring)."""
    n = int(seconds * sample_rate)
    out = np.zeros(n, dtype=np.float64)
    start = 0
    while start < n:
        length = min(int(rng.uniform(0.08, 0.24) * sample_rate), n - start)
        t = np.arange(length) / sample_rate
        if rng.random() < 0.15:
            seg = rng.standard_normal(length) * 0.3
        else:
            f0 = PITCHES_HZ[rng.integers(len(PITCHES_HZ))]
            seg = sum(g * np.sin(2 * np.pi * f0 * (k + 1) * t) for k, g in enumerate(HARMONIC_GAINS)) * 0.3
        fade = min(80, length // 2)  # 5 ms fades: no clicks at the boundaries
        if fade:
            ramp = np.linspace(0.0, 1.0, fade)
            seg[:fade] *= ramp
            seg[length - fade :] *= ramp[::-1]
        out[start : start + length] = seg * rng.uniform(0.5, 1.0)
        start += length
    out += rng.standard_normal(n) * 0.003
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def write_tone_manifest(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    min_seconds: float = 0.8,
    max_seconds: float = 1.6,
    sample_rate: int = 16_000,
) -> Path:
    """Write `n` WAV utterances and their manifest under `out_dir`; returns the manifest's path."""
    import soundfile as sf

    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        seconds = float(rng.uniform(min_seconds, max_seconds))
        wave = tone_utterance(rng, seconds, sample_rate)
        rel = f"clips/{i:06d}.wav"
        sf.write(str(out / rel), wave, sample_rate, subtype="PCM_16")
        records.append({"audio": rel, "duration": round(len(wave) / sample_rate, 4)})
    manifest = out / "manifest.jsonl"
    write_jsonl(manifest, records)
    return manifest


__all__ = ["tone_utterance", "write_tone_manifest"]
