"""80-dim log-mel features against torchaudio's reference, batching with padding, normalisation."""

import torch
import torchaudio
from torchaudio.compliance import kaldi

from herd.speech.features import LogMel, log_mel_features, normalize_per_utterance, num_frames, pad_features

# Tolerance of the parity test, on natural-log mel energies (measured: 0, bit-equal, on this machine).
LOG_MEL_ATOL = 1e-4


def utterance(seconds: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    return (
        0.3 * torch.sin(2 * torch.pi * 440 * t)
        + 0.1 * torch.sin(2 * torch.pi * 3100 * t)
        + 0.05 * torch.randn(t.shape, generator=g)
    )


def test_log_mel_equals_torchaudio_melspectrogram():
    wave = utterance(2.0, 0)
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=160, n_mels=80, center=False, power=2.0,
        mel_scale="htk", norm=None,
    )(wave)  # fmt: skip
    reference = reference.clamp_min(1e-10).log().T  # (T, 80)
    mel, frames = LogMel()(wave[None])
    assert mel.shape == (1, 198, 80) and int(frames[0]) == 198
    diff = (mel[0] - reference).abs().max().item()
    assert diff < LOG_MEL_ATOL, diff


def test_frames_follow_the_kaldi_framing_25ms_every_10ms():
    for n in (399, 400, 559, 560, 16000, 16123):
        expected = (
            kaldi.fbank(torch.zeros(1, n) + 0.1, frame_length=25, frame_shift=10, dither=0.0).shape[0]
            if n >= 400
            else 0
        )
        assert num_frames(n) == expected, n
        assert int(num_frames(torch.tensor([n]))[0]) == expected


def test_a_batch_with_padding_equals_each_utterance_alone():
    a, b = utterance(1.0, 1), utterance(0.45, 2)
    batch = torch.zeros(2, a.numel())
    batch[0], batch[1, : b.numel()] = a, b
    batch[1, b.numel() :] = 7.0  # whatever the padding holds
    mel, frames = LogMel()(batch, torch.tensor([a.numel(), b.numel()]))
    alone_a, alone_b = LogMel()(a[None])[0][0], LogMel()(b[None])[0][0]
    assert frames.tolist() == [alone_a.shape[0], alone_b.shape[0]] == [98, 43]
    torch.testing.assert_close(mel[0], alone_a, atol=0, rtol=0)
    torch.testing.assert_close(mel[1, :43], alone_b, atol=0, rtol=0)
    assert mel[1, 43:].abs().max() == 0  # padded frames are zero


def test_per_utterance_normalisation_over_real_frames_only():
    feats, lengths, mask = pad_features(
        [log_mel_features(utterance(1.0, 3)), log_mel_features(utterance(0.5, 4))]
    )
    assert lengths.tolist() == [98, 48] and mask.sum(1).tolist() == [98, 48]
    for i, n in enumerate(lengths.tolist()):
        real = feats[i, :n]
        assert real.mean(0).abs().max() < 1e-4
        # std 1 up to the variance floor: var / (var + 1e-5) for the quietest channels
        assert (real.std(0, unbiased=False) - 1).abs().max() < 1e-2
        assert not feats[i, n:].any()
    # normalising a padded batch equals normalising each utterance alone
    raw, frames = LogMel()(torch.stack([utterance(1.0, 3), torch.nn.functional.pad(utterance(0.5, 4), (0, 8000))]),
                           torch.tensor([16000, 8000]))  # fmt: skip
    torch.testing.assert_close(normalize_per_utterance(raw, frames), feats, atol=1e-5, rtol=0)
