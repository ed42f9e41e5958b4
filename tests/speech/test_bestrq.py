"""BEST-RQ: the frozen quantizer against a brute-force cosine search, masking statistics against their
formula, the multi-softmax loss against a per-codebook loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from herd.speech.bestrq import (
    BestRQArgs,
    BestRQModel,
    RandomProjectionQuantizer,
    apply_noise,
    expected_mask_fraction,
    masked_target_frames,
    multi_softmax_loss,
    span_mask,
)
from herd.speech.conformer_args import get_speech_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_papers_quantizer_shapes_unit_norm_codes_and_seed_determinism():
    args = BestRQArgs()  # the paper's: 16 codebooks × 8192 codes of 16 dims, from 320-dim stacked frames
    q = RandomProjectionQuantizer(320, args)
    assert q.projection.shape == (16, 320, 16) and q.codebooks.shape == (16, 8192, 16)
    assert torch.allclose(q.codebooks.norm(dim=-1), torch.ones(16, 8192), atol=1e-6)
    assert not list(q.parameters())  # frozen: buffers, never in the optimizer
    again = RandomProjectionQuantizer(320, args)
    assert torch.equal(q.projection, again.projection) and torch.equal(q.codebooks, again.codebooks)
    torch.manual_seed(123)  # the global RNG plays no part
    q.reset_parameters()
    assert torch.equal(q.codebooks, again.codebooks)
    other = RandomProjectionQuantizer(320, BestRQArgs(quantizer_seed=1))
    assert not torch.equal(q.codebooks, other.codebooks)
    x = torch.randn(3, 50, 320)
    assert torch.equal(q(x), again(x)) and q(x).shape == (3, 50, 16)
    assert (q(x) != other(x)).float().mean() > 0.9


def test_targets_equal_a_brute_force_cosine_argmin():
    args = BestRQArgs(num_codebooks=4, codebook_size=512)
    q = RandomProjectionQuantizer(320, args)
    x = torch.randn(2, 37, 320)
    codes = q(x)  # (2, 37, 4)
    flat = x.reshape(-1, 320)
    for c in range(4):
        projected = flat @ q.projection[c]  # (74, 16)
        # every (frame, code) pair's cosine distance, by torch's own cosine_similarity
        distance = 1 - F.cosine_similarity(projected[:, None, :], q.codebooks[c][None], dim=-1)  # (74, 512)
        assert torch.equal(codes.reshape(-1, 4)[:, c], distance.argmin(-1)), c
    # scaling a frame changes no code (cosine), and the chunked search equals the unchunked one
    assert torch.equal(q(3.7 * x), codes)
    big = RandomProjectionQuantizer(320, BestRQArgs())  # 16 × 8192: 1024 rows per chunk
    many = torch.randn(1100, 320)  # two chunks
    z = F.normalize(torch.einsum("md,cdk->cmk", many, big.projection), dim=-1)
    whole = torch.einsum("cmk,cvk->cmv", z, big.codebooks).argmax(-1).T
    assert torch.equal(big(many), whole)


def test_masking_statistics_match_the_formula():
    """P(frame t masked) = 1 − (1 − p)^min(t+1, 32): checked per position and on average over 4000
    utterances of 400 frames (1.6 M frames), against the binomial standard error."""
    p, span, L, n = 0.025, 32, 400, 4000
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([span_mask(L, L, p, span, g) for _ in range(n)]).float()  # (n, L)
    fraction = masks.mean().item()
    expected = expected_mask_fraction(L, p, span)
    assert abs(expected - (1 - 0.975**32)) < 0.02  # 0.541 at 400 frames, 0.555 far from the start
    # frames of one utterance are correlated over a span: the standard error is per utterance
    sem = masks.mean(1).std().item() / math.sqrt(n)
    assert abs(fraction - expected) < 4 * sem, (fraction, expected, sem)
    per_position = masks.mean(0)  # (L,)
    formula = torch.tensor([1 - (1 - p) ** min(t + 1, span) for t in range(L)])
    assert (per_position - formula).abs().max() < 4 * math.sqrt(0.25 / n)  # ≤ 0.032
    assert per_position[0] == pytest.approx(p, abs=0.01) and per_position[200] == pytest.approx(
        0.555, abs=0.03
    )
    # a span is 32 frames: a run of masked frames is at least 32 long unless cut by the end
    runs = []
    for row in masks[:200]:
        edges = torch.diff(torch.cat([torch.zeros(1), row, torch.zeros(1)]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs += [(int(s), int(e)) for s, e in zip(starts, ends)]
    assert runs and all(e - s >= span or e == L for s, e in runs)


def test_padding_is_never_masked_and_noise_replaces_masked_frames_only():
    g = torch.Generator().manual_seed(1)
    mask = span_mask(100, 140, 0.2, 32, g)
    assert not mask[100:].any() and mask[:100].any()
    feats = torch.randn(140, 80)
    noisy = apply_noise(feats, mask, 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(noisy[~mask], feats[~mask])
    assert noisy[mask].std().item() == pytest.approx(0.1, rel=0.05) and noisy[mask].mean().abs() < 0.01
    # an encoder frame carries a loss when any of its 4 input frames is masked
    frame = torch.zeros(1, 10, dtype=torch.bool)
    frame[0, 5] = True
    assert masked_target_frames(frame, torch.tensor([10]), 4).tolist() == [[False, True, False]]
    assert not masked_target_frames(frame, torch.tensor([5]), 4).any()  # frame 5 is padding there


def test_multi_softmax_loss_is_the_mean_over_codebooks_of_each_heads_cross_entropy():
    logits, targets = torch.randn(9, 3, 20), torch.randint(0, 20, (9, 3))
    loss, n = multi_softmax_loss(logits, targets)
    per_book = [F.cross_entropy(logits[:, c], targets[:, c], reduction="sum") for c in range(3)]
    assert n == 9 and torch.allclose(loss, sum(per_book) / 3)
    empty, zero = multi_softmax_loss(logits[:0], targets[:0])
    assert zero == 0 and empty.item() == 0


def test_the_model_predicts_codes_of_clean_features_at_masked_frames_only():
    torch.manual_seed(0)
    args = BestRQArgs(num_codebooks=3, codebook_size=64)
    model = BestRQModel(get_speech_preset("tiny"), args)
    feats, lengths = torch.randn(2, 40, 80), torch.tensor([40, 30])
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 3:9], mask[1, 20:36] = True, True  # row 1's frames 30+ are padding
    target_mask = masked_target_frames(mask, lengths, 4)  # (2, 10)
    inputs = feats.clone()
    inputs[mask] = 0.0
    logits, targets = model(inputs, lengths, feats, target_mask)
    assert target_mask.sum() == 3 + 3 and logits.shape == (6, 3, 64) and targets.shape == (6, 3)
    clean = feats.clone()
    clean[1, 30:] = 0.0  # padding is zeroed before stacking: encoder frame 7 of row 1 is half padding
    stacked = clean.reshape(2, 10, 320)
    assert torch.equal(targets[:3], model.quantizer(stacked[0, 0:3]))  # the clean frames' codes
    assert torch.equal(targets[3:], model.quantizer(stacked[1, 5:8]))
