"""Audio features of the speech encoder (paper §8.1.1): 80-dim log-mel spectrogram, 10 ms hop.

    waveform (N,) 16 kHz
      → frames of 25 ms (400 samples) every 10 ms (160 samples), no centring: frame t covers samples
        [160·t, 160·t + 400), so an utterance of N ≥ 400 samples has 1 + (N − 400) // 160 frames
      → periodic Hann window, |FFT₄₀₀|² (201 bins)
      → 80 triangular mel filters (HTK mel scale, 0–8 kHz; torchaudio's `melscale_fbanks`)
      → log(max(·, 1e-10))                                              (T, 80)
      → per-utterance mean/variance normalisation: every mel channel to mean 0, standard deviation 1
        over the utterance's frames                                      (T, 80)

The spectrogram equals torchaudio's `MelSpectrogram(n_fft=400, hop_length=160, n_mels=80, center=False)`
(tests/speech/test_log_mel.py: max |Δ log-mel| < 1e-4 over a 2 s utterance; measured numbers in
docs/speech.md). Ours takes a padded *batch* with lengths and returns each utterance's frames with a
padding mask; because frames are not centred, a frame of a short utterance only reads its own samples,
so padding changes nothing.

No I/O here: `herd.speech.audio` reads the waveforms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
N_MELS = 80
WIN_LENGTH = 400  # 25 ms at 16 kHz
HOP_LENGTH = 160  # 10 ms
N_FFT = 400
LOG_FLOOR = 1e-10  # log(0) guard: −23 for digital silence
NORM_EPS = 1e-5  # variance floor of the per-utterance normalisation (a constant channel)


def num_frames(num_samples: torch.Tensor | int) -> torch.Tensor | int:
    """Frames of an utterance of `num_samples` samples: 1 + (N − 400) // 160, 0 when N < 400."""
    if isinstance(num_samples, int):
        return 0 if num_samples < WIN_LENGTH else 1 + (num_samples - WIN_LENGTH) // HOP_LENGTH
    frames = 1 + torch.div(num_samples - WIN_LENGTH, HOP_LENGTH, rounding_mode="floor")
    return torch.where(num_samples < WIN_LENGTH, torch.zeros_like(frames), frames)


class LogMel(nn.Module):
    """Batched 80-dim log-mel spectrogram (see the module docstring); buffers only, no parameters."""

    def __init__(self, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> None:
        super().__init__()
        from torchaudio.functional import melscale_fbanks

        self.n_mels, self.sample_rate = n_mels, sample_rate
        self.register_buffer("window", torch.hann_window(WIN_LENGTH, periodic=True), persistent=False)
        fbank = melscale_fbanks(
            N_FFT // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, norm=None, mel_scale="htk"
        )
        self.register_buffer("fbank", fbank, persistent=False)  # (201, n_mels)

    def forward(
        self,
        waveforms: torch.Tensor,  # (B, N) float, zero-padded after each utterance's end
        lengths: torch.Tensor | None = None,  # (B,) samples; None: every row is whole
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-mel (B, T, n_mels), frames (B,)); rows past an utterance's frames are zero."""
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got shape {tuple(waveforms.shape)}")
        B, N = waveforms.shape
        if lengths is None:
            lengths = torch.full((B,), N, dtype=torch.long, device=waveforms.device)
        frames = num_frames(lengths)
        if N < WIN_LENGTH:
            return waveforms.new_zeros(B, 0, self.n_mels), frames
        x = waveforms.float().unfold(-1, WIN_LENGTH, HOP_LENGTH)  # (B, T, 400)
        power = torch.fft.rfft(x * self.window, n=N_FFT).abs().pow(2)  # (B, T, 201)
        mel = (power @ self.fbank).clamp_min(LOG_FLOOR).log()  # (B, T, n_mels)
        mel = mel * (torch.arange(mel.shape[1], device=mel.device)[None, :] < frames[:, None])[..., None]
        return mel, frames


def normalize_per_utterance(features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Each mel channel of each utterance to mean 0, std 1 over its real frames (padding stays 0).

    features (B, T, C), frames (B,) → (B, T, C)."""
    mask = (torch.arange(features.shape[1], device=features.device)[None, :] < frames[:, None])[..., None]
    mask = mask.to(features.dtype)  # (B, T, 1)
    count = mask.sum(1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    mean = (features * mask).sum(1, keepdim=True) / count  # (B, 1, C)
    var = ((features - mean).pow(2) * mask).sum(1, keepdim=True) / count
    return (features - mean) * torch.rsqrt(var + NORM_EPS) * mask


def log_mel_features(waveform: torch.Tensor, log_mel: LogMel | None = None) -> torch.Tensor:
    """One utterance's normalised log-mel features: (N,) 16 kHz samples → (T, 80)."""
    log_mel = log_mel if log_mel is not None else LogMel()
    mel, frames = log_mel(waveform.reshape(1, -1))
    return normalize_per_utterance(mel, frames)[0]


def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Utterances of (T_i, C) frames → (features (B, T, C) zero-padded, lengths (B,), mask (B, T) True on
    real frames)."""
    if not features:
        raise ValueError("pad_features needs at least one utterance")
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    T = int(lengths.max())
    out = torch.stack([F.pad(f, (0, 0, 0, T - f.shape[0])) for f in features])  # (B, T, C)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return out, lengths, mask


def pad_waveforms(waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-d waveforms → ((B, N) zero-padded, lengths (B,) in samples)."""
    lengths = torch.tensor([w.numel() for w in waveforms], dtype=torch.long)
    N = int(lengths.max()) if len(waveforms) else 0
    return torch.stack([F.pad(w.reshape(-1), (0, N - w.numel())) for w in waveforms]), lengths


__all__ = [
    "HOP_LENGTH",
    "N_MELS",
    "SAMPLE_RATE",
    "WIN_LENGTH",
    "LogMel",
    "log_mel_features",
    "normalize_per_utterance",
    "num_frames",
    "pad_features",
    "pad_waveforms",
]
